import Crypto
import VMTemplateOS
import VMTemplateQEMU
import Foundation

/// `manifest.json` of a published template: what it is, how it was made, and how to rebuild a
/// machine that its device state loads into.
public struct TemplateManifest: Sendable, Codable, Equatable {
    public init(formatVersion: Int, name: String, createdAt: Date, qemu: QEMUInfo, machine: MachineSpec, boot: BootInfo, readyMarker: String, memory: StoredFile, state: StoredFile, migration: MigrationInfo, templateArguments: [String], timings: CreateTimings, guestClock: GuestClock? = nil, disks: [StoredFile]? = nil, readyWhen: ReadyCondition? = nil, guestCommands: [[String]]? = nil) {
        self.guestClock = guestClock
        self.disks = disks
        self.readyWhen = readyWhen
        self.guestCommands = guestCommands
        self.formatVersion = formatVersion
        self.name = name
        self.createdAt = createdAt
        self.qemu = qemu
        self.machine = machine
        self.boot = boot
        self.readyMarker = readyMarker
        self.memory = memory
        self.state = state
        self.migration = migration
        self.templateArguments = templateArguments
        self.timings = timings
    }

    public static let currentFormatVersion = 1

    public var formatVersion: Int
    public var name: String
    public var createdAt: Date
    public var qemu: QEMUInfo
    public var machine: MachineSpec
    public var boot: BootInfo
    public var readyMarker: String
    /// How clones set their guest's clock and hostname (nil in manifests from before it existed: none).
    public var guestClock: GuestClock?
    public var memory: StoredFile
    public var state: StoredFile
    /// The template's copies of its boot disks (`disk0.raw`, ...), one per
    /// ``MachineSpec/bootDisks`` entry, as the paused guest left them; nil: none.
    public var disks: [StoredFile]?
    /// How the guest was judged ready (nil in manifests from before it existed: the marker).
    public var readyWhen: ReadyCondition?
    /// What each clone's guest agent runs after its clock and hostname (``GuestCommand``).
    public var guestCommands: [[String]]?
    public var migration: MigrationInfo
    /// Where the template came from when it was pulled or imported rather than made here.
    public var origin: Origin?
    /// The exact QEMU arguments the template VM ran with, for diagnosis.
    public var templateArguments: [String]
    public var timings: CreateTimings

    /// What tells this template from every other one made under the same name, before or after
    /// it (`sha256:` and 64 hex digits): a digest of its name, the time it was made, and its two
    /// files' digests and inodes. A clone record pins it, so that a pool member of a removed
    /// template is never handed out for its successor.
    public var identity: String {
        var text = "\(name)\n\(createdAt.timeIntervalSince1970)\n\(memory.sha256) \(memory.inode)\n\(state.sha256) \(state.inode)\n"
        // Only when there are disks: the identities of templates without any stay as they were.
        for disk in disks ?? [] { text += "\(disk.name) \(disk.sha256) \(disk.inode)\n" }
        return "sha256:" + SHA256.hash(data: Data(text.utf8)).map { String(format: "%02x", $0) }.joined()
    }

    /// Every file of the template: RAM, device state, boot disks.
    public var storedFiles: [StoredFile] { [memory, state] + (disks ?? []) }

    /// The name of boot disk `index`'s copy in the template directory.
    public static func diskFileName(_ index: Int, format: DiskFormat) -> String { "disk\(index).\(format.rawValue)" }

    /// Whether `text` has the form of an ``identity``.
    public static func isIdentity(_ text: String) -> Bool {
        text.utf8.count == 71 && text.hasPrefix("sha256:") && text.utf8.dropFirst(7).allSatisfy { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }
    }

    enum CodingKeys: String, CodingKey {
        case formatVersion = "format_version"
        case name
        case createdAt = "created_at"
        case qemu, machine, boot
        case readyMarker = "ready_marker"
        case guestClock = "guest_clock"
        case memory, state, disks, migration
        case readyWhen = "ready_when"
        case guestCommands = "guest_commands"
        case templateArguments = "template_arguments"
        case timings, origin
    }

    /// A pulled (or imported) template's source: the reference asked for and the manifest digest
    /// that was published, which names exactly these bytes in any registry.
    public struct Origin: Sendable, Codable, Equatable {
        public var reference: String
        public var digest: String
        /// The chunks the template arrived in: a later pull finds here which of its chunks this
        /// node has already (and hashes them before it believes it).
        public var chunks: [Chunk]?

        public init(reference: String, digest: String = "", chunks: [Chunk]? = nil) {
            self.reference = reference
            self.digest = digest
            self.chunks = chunks
        }

        public func with(digest: String) -> Origin {
            Origin(reference: reference, digest: digest, chunks: chunks)
        }

        public struct Chunk: Sendable, Codable, Equatable {
            public var file: String
            public var offset: UInt64
            public var length: Int
            /// `sha256:…` of the chunk's bytes as they are in the file.
            public var digest: String

            public init(file: String, offset: UInt64, length: Int, digest: String) {
                self.file = file
                self.offset = offset
                self.length = length
                self.digest = digest
            }
        }
    }

    public struct QEMUInfo: Sendable, Codable, Equatable {
        public init(path: String, version: QEMUVersion, package: String?, capabilities: QEMUCapabilities?, binary: BinaryFingerprint?) {
            self.path = path
            self.version = version
            self.package = package
            self.capabilities = capabilities
            self.binary = binary
        }

        public var path: String
        public var version: QEMUVersion
        public var package: String?
        /// What the binary could do when the template was made; trusted by `clone` as long as the
        /// binary is the same file (`binary`), so cloning does not pay for probing QEMU.
        public var capabilities: QEMUCapabilities?
        public var binary: BinaryFingerprint?
    }

    /// Identifies a file cheaply: if none of these changed, it is the same binary.
    public struct BinaryFingerprint: Sendable, Codable, Equatable {
        public var sizeBytes: UInt64
        public var inode: UInt64
        public var modifiedNanoseconds: Int64

        public init(_ status: FileStatus) {
            sizeBytes = status.sizeBytes
            inode = status.inode
            modifiedNanoseconds = status.modifiedNanoseconds
        }

        enum CodingKeys: String, CodingKey {
            case sizeBytes = "size_bytes"
            case inode
            case modifiedNanoseconds = "mtime_ns"
        }
    }

    public struct BootInfo: Sendable, Codable, Equatable {
        public init(kernel: FileReference, initrd: FileReference?, append: String, disks: [FileReference]? = nil) {
            self.kernel = kernel
            self.initrd = initrd
            self.append = append
            self.disks = disks
        }

        public var kernel: FileReference
        public var initrd: FileReference?
        public var append: String
        /// The recipe's disks the template's copies were made from, as they were then.
        public var disks: [FileReference]?
    }

    /// A file outside the store that the template was made from.
    public struct FileReference: Sendable, Codable, Equatable {
        public init(path: String, sizeBytes: UInt64, sha256: String) {
            self.path = path
            self.sizeBytes = sizeBytes
            self.sha256 = sha256
        }

        public var path: String
        public var sizeBytes: UInt64
        public var sha256: String

        enum CodingKeys: String, CodingKey {
            case path
            case sizeBytes = "size_bytes"
            case sha256
        }
    }

    /// A file inside the template directory, with what a quick check compares before trusting it.
    public struct StoredFile: Sendable, Codable, Equatable {
        public init(name: String, sizeBytes: UInt64, sha256: String, mode: UInt16, inode: UInt64, modifiedNanoseconds: Int64) {
            self.name = name
            self.sizeBytes = sizeBytes
            self.sha256 = sha256
            self.mode = mode
            self.inode = inode
            self.modifiedNanoseconds = modifiedNanoseconds
        }

        public var name: String
        public var sizeBytes: UInt64
        public var sha256: String
        public var mode: UInt16
        public var inode: UInt64
        public var modifiedNanoseconds: Int64

        enum CodingKeys: String, CodingKey {
            case name
            case sizeBytes = "size_bytes"
            case sha256, mode, inode
            case modifiedNanoseconds = "mtime_ns"
        }

        /// The mode as people write it, an octal string ("0444"); manifests from before 0.4 hold
        /// a number, still read.
        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            name = try c.decode(String.self, forKey: .name)
            sizeBytes = try c.decode(UInt64.self, forKey: .sizeBytes)
            sha256 = try c.decode(String.self, forKey: .sha256)
            inode = try c.decode(UInt64.self, forKey: .inode)
            modifiedNanoseconds = try c.decode(Int64.self, forKey: .modifiedNanoseconds)
            if let number = try? c.decode(UInt16.self, forKey: .mode) {
                guard number <= 0o7777 else {
                    throw DecodingError.dataCorruptedError(forKey: .mode, in: c, debugDescription: "\(number) is not a file mode")
                }
                mode = number
            } else {
                let text = try c.decode(String.self, forKey: .mode)
                guard text.utf8.count <= 6, let parsed = UInt16(text, radix: 8), parsed <= 0o7777 else {
                    throw DecodingError.dataCorruptedError(forKey: .mode, in: c, debugDescription: "'\(text)' is not an octal file mode such as \"0444\"")
                }
                mode = parsed
            }
        }

        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(name, forKey: .name)
            try c.encode(sizeBytes, forKey: .sizeBytes)
            try c.encode(sha256, forKey: .sha256)
            try c.encode(Self.octal(mode), forKey: .mode)
            try c.encode(inode, forKey: .inode)
            try c.encode(modifiedNanoseconds, forKey: .modifiedNanoseconds)
        }

        /// "0444": four octal digits.
        public static func octal(_ mode: UInt16) -> String {
            let digits = String(mode & 0o7777, radix: 8)
            return String(repeating: "0", count: max(0, 4 - digits.count)) + digits
        }
    }

    public struct MigrationInfo: Sendable, Codable, Equatable {
        public init(capabilities: [String], uriScheme: String) {
            self.capabilities = capabilities
            self.uriScheme = uriScheme
        }

        /// Migration capabilities the state was saved with; a clone must load it with the same.
        public var capabilities: [String]
        /// `file` or `exec`: how the state was written.
        public var uriScheme: String

        enum CodingKeys: String, CodingKey {
            case capabilities
            case uriScheme = "uri_scheme"
        }

        /// How the state file is read back; an unknown scheme falls back to the pipe, which every
        /// QEMU has.
        public var transport: MigrationTransport { MigrationTransport(rawValue: uriScheme) ?? .exec }
    }
}

/// How long each phase of `create` took, in seconds.
public struct CreateTimings: Sendable, Codable, Equatable {
    public var bootToReady: Double
    public var pause: Double
    public var save: Double
    public var digest: Double
    public var publish: Double
    public var total: Double

    public init(bootToReady: Double = 0, pause: Double = 0, save: Double = 0, digest: Double = 0, publish: Double = 0, total: Double = 0) {
        self.bootToReady = bootToReady
        self.pause = pause
        self.save = save
        self.digest = digest
        self.publish = publish
        self.total = total
    }

    enum CodingKeys: String, CodingKey {
        case bootToReady = "boot_to_ready"
        case pause, save, digest, publish, total
    }
}
