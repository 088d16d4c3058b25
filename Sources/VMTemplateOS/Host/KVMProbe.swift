#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Whether KVM can run ordinary (stock-kernel) guests here, and why not if it cannot.
///
/// A working /dev/kvm is not enough: under PVM (the kvm_pvm module, used inside some cloud VMs)
/// /dev/kvm answers every ioctl yet stock guest kernels hang, so the provider module matters too.
public struct KVMProbe: Sendable, Codable, Equatable {
    /// The device node that was probed.
    public var devicePath: String
    /// The device node exists.
    public var devicePresent: Bool
    /// The device opens read-write and reports KVM API version 12.
    public var deviceUsable: Bool
    /// The KVM API version the device reported, if it answered.
    public var apiVersion: Int32?
    /// KVM modules present in /sys/module (kvm, kvm_intel, kvm_amd, kvm_pvm, ...), sorted.
    public var modules: [String]
    /// Stock guests can use KVM: the device is usable and provided by kvm_intel or kvm_amd, not PVM.
    public var usableForStockGuests: Bool
    /// A sentence explaining the decision and what to do.
    public var reason: String

    /// The API version every KVM since Linux 2.6.22 reports; anything else is not a usable KVM.
    static let expectedAPIVersion: Int32 = 12
    /// `_IO(KVMIO, 0x00)`: KVM_GET_API_VERSION.
    static let getAPIVersionRequest: UInt = 0xAE00

    /// Probes the device and the loaded modules; never throws, the verdict is in the result.
    public static func probe(devicePath: String = "/dev/kvm", sysModuleDir: String = "/sys/module") -> KVMProbe {
        let modules = kvmModules(in: sysModuleDir)
        var info = stat()
        guard stat(devicePath, &info) == 0 else {
            return decide(devicePath: devicePath, devicePresent: false, apiVersion: nil, deviceProblem: nil, modules: modules)
        }
        let fd = open(devicePath, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else {
            let code = errno
            let problem = code == EACCES || code == EPERM
                ? "\(devicePath) cannot be opened: permission denied; add this user to the group that owns it (usually kvm), or use TCG"
                : "\(devicePath) cannot be opened (\(errnoText(code))); use TCG"
            return decide(devicePath: devicePath, devicePresent: true, apiVersion: nil, deviceProblem: problem, modules: modules)
        }
        defer { close(fd) }
        let version = ioctl(fd, getAPIVersionRequest)
        guard version >= 0 else {
            let problem = "\(devicePath) does not answer KVM_GET_API_VERSION (\(errnoText(errno))), so it is not a KVM device; use TCG"
            return decide(devicePath: devicePath, devicePresent: true, apiVersion: nil, deviceProblem: problem, modules: modules)
        }
        return decide(devicePath: devicePath, devicePresent: true, apiVersion: version, deviceProblem: nil, modules: modules)
    }

    /// The rule, separated from the probing so it can be tested without a real /dev/kvm.
    ///
    /// `deviceProblem` is a sentence explaining why an existing device could not be used, if it could not.
    static func decide(devicePath: String, devicePresent: Bool, apiVersion: Int32?, deviceProblem: String?, modules: [String]) -> KVMProbe {
        let deviceUsable = devicePresent && deviceProblem == nil && apiVersion == expectedAPIVersion
        let hardwareModule = ["kvm_intel", "kvm_amd"].first(where: modules.contains)
        let hasPVM = modules.contains("kvm_pvm")

        let reason: String
        var usable = false
        if !devicePresent {
            reason = "\(devicePath) does not exist, so KVM is unavailable; load kvm_intel or kvm_amd, or use TCG"
        } else if let deviceProblem {
            reason = deviceProblem
        } else if let apiVersion, apiVersion != expectedAPIVersion {
            reason = "\(devicePath) reports KVM API version \(apiVersion) instead of \(expectedAPIVersion); use TCG"
        } else if !deviceUsable {
            reason = "\(devicePath) did not report a KVM API version; use TCG"
        } else if let hardwareModule {
            usable = true
            reason = "\(devicePath) is provided by \(hardwareModule); stock guests can use KVM"
        } else if hasPVM {
            reason = "\(devicePath) is provided by kvm_pvm (PVM), which hangs stock guest kernels; use TCG"
        } else {
            reason = "\(devicePath) works but neither kvm_intel nor kvm_amd is loaded, so its provider is unknown and may hang stock guests; load kvm_intel or kvm_amd, or use TCG"
        }
        return KVMProbe(
            devicePath: devicePath, devicePresent: devicePresent, deviceUsable: deviceUsable, apiVersion: apiVersion,
            modules: modules, usableForStockGuests: usable, reason: reason
        )
    }

    /// Names in `sysModuleDir` that are "kvm" or start with "kvm_"; built-in modules with
    /// parameters (kvm_intel usually has some) appear there too.
    static func kvmModules(in sysModuleDir: String) -> [String] {
        guard let directory = opendir(sysModuleDir) else { return [] }
        defer { closedir(directory) }
        var names: [String] = []
        while let entry = readdir(directory) {
            let name = withUnsafePointer(to: &entry.pointee.d_name) { pointer in
                pointer.withMemoryRebound(to: CChar.self, capacity: MemoryLayout.size(ofValue: entry.pointee.d_name)) {
                    String(cString: $0)
                }
            }
            if name == "kvm" || name.hasPrefix("kvm_") { names.append(name) }
        }
        return names.sorted()
    }
}
