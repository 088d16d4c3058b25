import Foundation
import VMTemplateOS
/// What `vmtemplate doctor` reports: can this machine make templates and clones, and how.
package struct DoctorReport: Sendable, Codable, Equatable {
    package var qemuPath: String?
    package var qemuVersion: String?
    package var qemuPackage: String?
    package var supportsROM: Bool
    package var supportsFileMigration: Bool
    package var kvmUsable: Bool
    package var kvmReason: String
    package var defaultAccel: Accelerator
    /// How QEMU started by this user is confined (seccomp, the user it drops to), in words.
    package var confinement: String
    /// Things that work but deserve attention (e.g. clones that must open the template read-write).
    package var warnings: [String]
    /// Things that stop vmtemplate from working, each with what to do.
    package var problems: [String]

    enum CodingKeys: String, CodingKey {
        case qemuPath = "qemu_path"
        case qemuVersion = "qemu_version"
        case qemuPackage = "qemu_package"
        case supportsROM = "supports_rom"
        case supportsFileMigration = "supports_file_migration"
        case kvmUsable = "kvm_usable"
        case kvmReason = "kvm_reason"
        case defaultAccel = "default_accel"
        case confinement
        case warnings, problems
    }

    /// Probes the QEMU binary (`--qemu`, `$VMTEMPLATE_QEMU`, `PATH`) and KVM.
    package static func run(explicitQEMU: String?, kvm: KVMProbe = .probe()) -> DoctorReport {
        var report = DoctorReport(
            qemuPath: nil, qemuVersion: nil, qemuPackage: nil,
            supportsROM: false, supportsFileMigration: false,
            kvmUsable: kvm.usableForStockGuests, kvmReason: kvm.reason,
            defaultAccel: kvm.usableForStockGuests ? .kvm : .tcg,
            confinement: "not root: QEMU runs as this user",
            warnings: [], problems: []
        )
        do {
            let binary = try QEMUBinary.probe(path: try QEMUBinary.locate(explicit: explicitQEMU))
            report.qemuPath = binary.path
            report.qemuVersion = binary.version.description
            report.qemuPackage = binary.package
            report.supportsROM = binary.capabilities.supportsROM
            report.supportsFileMigration = binary.capabilities.supportsFileMigration
            if let confinement = QEMUConfinement.forThisProcess(version: binary.version, userMayRead: true, denySpawn: binary.capabilities.supportsFileMigration) {
                if let user = confinement.user {
                    report.confinement = "seccomp sandbox; clones drop to user \(user) where their template is readable by it"
                } else if geteuid() != 0 {
                    report.confinement = "seccomp sandbox (no privilege elevation); not root: QEMU runs as this user"
                } else {
                    report.confinement = "seccomp sandbox only: QEMU keeps root"
                    report.warnings.append(binary.version < QEMUVersion(9, 1)
                        ? "QEMU \(binary.version) has no -run-with user= (9.1): clones started by root keep root, sandboxed."
                        : "there is no user \(QEMUConfinement.systemUser): clones started by root keep root, sandboxed; run scripts/setup to create it.")
                }
            } else if geteuid() == 0 {
                report.confinement = "none (\(QEMUConfinement.environmentVariable)=off, or QEMU older than 2.11)"
            }
            if !binary.capabilities.supportsMachineMemoryBackend || !binary.capabilities.supportsIgnoreShared {
                report.problems.append("QEMU \(binary.version) is too old for templates: install QEMU >= 8.2 (scripts/setup uses bookworm-backports).")
            } else if !binary.capabilities.supportsROM {
                report.warnings.append("QEMU \(binary.version) has no memory-backend-file rom= (needs 8.2): clones could only open the template read-write (--allow-writable-template), protected by the private mapping alone. Install QEMU >= 8.2.")
            }
        } catch let error as VMTemplateError {
            report.problems.append(error.message)
        } catch {
            report.problems.append("\(error)")
        }
        return report
    }
}
