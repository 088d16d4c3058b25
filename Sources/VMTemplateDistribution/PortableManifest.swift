import Foundation
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

/// A template's `manifest.json` without the facts of the node that made it (inodes, modification
/// times, modes, the QEMU binary's path and fingerprint, the store's paths in its arguments, the
/// paths of its boot files): what makes the template, the same on every node. The config of its
/// OCI artifact, so its digest names the template wherever it goes.
public struct PortableManifest: Codable, Sendable, Equatable {
    public static let currentFormatVersion = 1

    public struct QEMU: Codable, Sendable, Equatable {
        public var version: QEMUVersion
        public var package: String?
    }

    /// A file by its name, size and digest: one of the template's, as its chunks rebuild it, or a
    /// boot file's provenance (its name, not the build node's path).
    public struct File: Codable, Sendable, Equatable {
        public var name: String
        public var sizeBytes: UInt64
        public var sha256: String

        enum CodingKeys: String, CodingKey {
            case name
            case sizeBytes = "size_bytes"
            case sha256
        }
    }

    public var formatVersion: Int
    /// The template's name where it was made (a pull may give it another).
    public var name: String
    public var createdAt: Date
    public var qemu: QEMU
    public var machine: MachineSpec
    public var kernel: File
    public var initrd: File?
    public var bootDisks: [File]?
    public var append: String
    public var readyMarker: String
    public var readyWhen: ReadyCondition?
    public var guestClock: GuestClock?
    public var guestCommands: [[String]]?
    public var migration: TemplateManifest.MigrationInfo
    /// RAM (`memory`), device state (`state`), boot disks (`disk0.raw`...), in that order.
    public var files: [File]

    enum CodingKeys: String, CodingKey {
        case formatVersion = "format_version"
        case name
        case createdAt = "created_at"
        case qemu, machine, kernel, initrd
        case bootDisks = "boot_disks"
        case append
        case readyMarker = "ready_marker"
        case readyWhen = "ready_when"
        case guestClock = "guest_clock"
        case guestCommands = "guest_commands"
        case migration, files
    }

    public init(_ manifest: TemplateManifest) {
        formatVersion = Self.currentFormatVersion
        name = manifest.name
        createdAt = manifest.createdAt
        qemu = QEMU(version: manifest.qemu.version, package: manifest.qemu.package)
        machine = manifest.machine
        func source(_ reference: TemplateManifest.FileReference) -> File {
            File(name: FileSystem.split(reference.path).name, sizeBytes: reference.sizeBytes, sha256: reference.sha256)
        }
        kernel = source(manifest.boot.kernel)
        initrd = manifest.boot.initrd.map(source)
        bootDisks = manifest.boot.disks?.map(source)
        append = manifest.boot.append
        readyMarker = manifest.readyMarker
        readyWhen = manifest.readyWhen
        guestClock = manifest.guestClock
        guestCommands = manifest.guestCommands
        migration = manifest.migration
        files = manifest.storedFiles.map { File(name: $0.name, sizeBytes: $0.sizeBytes, sha256: $0.sha256) }
    }

    /// A name a template file may have: `memory`, `state`, or a boot disk's `diskN.raw|qcow2`.
    static func isFileName(_ name: String) -> Bool {
        if name == "memory" || name == "state" { return true }
        for format in DiskFormat.allCases {
            let suffix = ".\(format.rawValue)"
            guard name.hasPrefix("disk"), name.hasSuffix(suffix) else { continue }
            let number = name.dropFirst(4).dropLast(suffix.count)
            return !number.isEmpty && number.count <= 2 && number.utf8.allSatisfy { (0x30...0x39).contains($0) }
        }
        return false
    }

    /// Why this manifest cannot be a template's, or nil: checked before anything else is fetched.
    func problem() -> String? {
        guard formatVersion == Self.currentFormatVersion else { return "its format version is \(formatVersion); this vmtemplate reads \(Self.currentFormatVersion)" }
        guard files.count >= 2, files[0].name == "memory", files[1].name == "state" else { return "it does not list the memory and state files first" }
        guard files.count == 2 + machine.bootDisks.count else { return "it lists \(files.count - 2) boot disk files for \(machine.bootDisks.count) boot disks" }
        guard Set(files.map(\.name)).count == files.count, files.allSatisfy({ Self.isFileName($0.name) && Digest.isSHA256("sha256:\($0.sha256)") && $0.sizeBytes <= TemplateArtifact.maxFileBytes }) else {
            return "its files have names, digests or sizes out of bounds"
        }
        guard files[0].sizeBytes == machine.memoryBytes else { return "its memory file is \(files[0].sizeBytes) bytes for \(machine.memoryBytes) bytes of guest memory" }
        return nil
    }

    /// The manifest of the template as this node keeps it: this node's QEMU, and the files as they
    /// lie in `directory` now.
    func localManifest(name: String, qemu local: TemplateManifest.QEMUInfo, files stored: [TemplateManifest.StoredFile]) -> TemplateManifest {
        func reference(_ source: File) -> TemplateManifest.FileReference {
            TemplateManifest.FileReference(path: source.name, sizeBytes: source.sizeBytes, sha256: source.sha256)
        }
        return TemplateManifest(
            formatVersion: TemplateManifest.currentFormatVersion,
            name: name,
            createdAt: createdAt,
            qemu: local,
            machine: machine,
            boot: .init(kernel: reference(kernel), initrd: initrd.map(reference), append: append, disks: bootDisks?.map(reference)),
            readyMarker: readyMarker,
            memory: stored[0],
            state: stored[1],
            migration: migration,
            templateArguments: [],
            timings: CreateTimings(),
            guestClock: guestClock,
            disks: stored.count > 2 ? Array(stored[2...]) : nil,
            readyWhen: readyWhen,
            guestCommands: guestCommands
        )
    }
}
