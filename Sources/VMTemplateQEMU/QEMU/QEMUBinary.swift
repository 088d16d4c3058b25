import VMTemplateOS
import Foundation

/// What a QEMU binary can do, as far as vmtemplate cares.
public struct QEMUCapabilities: Sendable, Codable, Equatable {
    /// `memory-backend-file` has `rom` (QEMU >= 8.2): clones can open the template read-only.
    public var supportsROM: Bool
    /// `file:` migration URIs (QEMU >= 8.2); older ones save through `exec:cat`.
    public var supportsFileMigration: Bool
    /// `x-ignore-shared` and a private destination (QEMU >= 4.1): templating works at all.
    public var supportsIgnoreShared: Bool
    /// `-machine memory-backend=` (QEMU >= 5.0).
    public var supportsMachineMemoryBackend: Bool

    public init(supportsROM: Bool, supportsFileMigration: Bool, supportsIgnoreShared: Bool, supportsMachineMemoryBackend: Bool) {
        self.supportsROM = supportsROM
        self.supportsFileMigration = supportsFileMigration
        self.supportsIgnoreShared = supportsIgnoreShared
        self.supportsMachineMemoryBackend = supportsMachineMemoryBackend
    }

    enum CodingKeys: String, CodingKey {
        case supportsROM = "supports_rom"
        case supportsFileMigration = "supports_file_migration"
        case supportsIgnoreShared = "supports_ignore_shared"
        case supportsMachineMemoryBackend = "supports_machine_memory_backend"
    }

    /// The capabilities a given release has, for tests and for binaries whose help cannot be read.
    public init(version: QEMUVersion) {
        self.init(
            supportsROM: version >= .romAndFileMigration,
            supportsFileMigration: version >= .romAndFileMigration,
            supportsIgnoreShared: version >= .privateIgnoreShared,
            supportsMachineMemoryBackend: version >= .machineMemoryBackend
        )
    }
}

/// A located and probed `qemu-system-x86_64`.
public struct QEMUBinary: Sendable, Codable, Equatable {
    public var path: String
    public var version: QEMUVersion
    /// The distribution's package string, e.g. `Debian 1:10.0.2+ds-2+deb13u1~bpo12+1`.
    public var package: String?
    public var capabilities: QEMUCapabilities

    public static let defaultName = "qemu-system-x86_64"
    public static let environmentVariable = "VMTEMPLATE_QEMU"

    /// Finds the binary: an explicit `--qemu` path, else `$VMTEMPLATE_QEMU`, else `PATH`.
    public static func locate(explicit: String?, environment: [String: String] = ProcessInfo.processInfo.environment) throws -> String {
        if let explicit, !explicit.isEmpty {
            return try checkExecutable(explicit, origin: "--qemu")
        }
        if let fromEnvironment = environment[environmentVariable], !fromEnvironment.isEmpty {
            return try checkExecutable(fromEnvironment, origin: "$\(environmentVariable)")
        }
        let searchPath = environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
        for directory in searchPath.split(separator: ":") {
            let candidate = "\(directory)/\(defaultName)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        throw VMTemplateError(
            .notFound,
            "\(defaultName) was not found on PATH: run scripts/setup (installs QEMU >= 8.2 from bookworm-backports), or pass --qemu PATH or set \(environmentVariable)."
        )
    }

    private static func checkExecutable(_ path: String, origin: String) throws -> String {
        guard FileManager.default.isExecutableFile(atPath: path) else {
            throw VMTemplateError(.notFound, "QEMU binary '\(path)' from \(origin) does not exist or is not executable: give the path of qemu-system-x86_64.")
        }
        return path
    }

    /// Runs `--version` and `-object memory-backend-file,help` to learn what the binary supports.
    public static func probe(path: String) throws -> QEMUBinary {
        let output = try ShortCommand.run(path, ["--version"])
        guard output.status == 0, let firstLine = output.stdout.split(separator: "\n").first else {
            throw VMTemplateError(.qemuFailed, "'\(path) --version' failed: is it a QEMU system emulator?", detail: output.stderr)
        }
        // "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"
        guard let range = firstLine.range(of: "version "),
              let version = QEMUVersion(parsing: String(firstLine[range.upperBound...]))
        else {
            throw VMTemplateError(.qemuFailed, "could not read the version of '\(path)' from '\(firstLine)': is it a QEMU system emulator?")
        }
        var package: String?
        if let open = firstLine.firstIndex(of: "("), let close = firstLine.lastIndex(of: ")"), open < close {
            package = String(firstLine[firstLine.index(after: open)..<close])
        }
        var capabilities = QEMUCapabilities(version: version)
        // The help text is the ground truth for `rom`: a distribution could backport it.
        if let help = try? ShortCommand.run(path, ["-object", "memory-backend-file,help"]), help.status == 0 {
            capabilities.supportsROM = help.stdout.contains("rom=")
        }
        return QEMUBinary(path: path, version: version, package: package, capabilities: capabilities)
    }

    /// Resolves a machine alias such as `q35` to the versioned type it stands for (`pc-q35-10.0`).
    ///
    /// Device state only loads into the same machine version, so templates always record the
    /// versioned name. A name that is already versioned is checked to exist.
    public func resolveMachineType(_ name: String) throws -> String {
        let output = try ShortCommand.run(path, ["-machine", "help"])
        guard output.status == 0 else {
            throw VMTemplateError(.qemuFailed, "'\(path) -machine help' failed.", detail: output.stderr)
        }
        var known: Set<String> = []
        for line in output.stdout.split(separator: "\n") {
            let columns = line.split(separator: " ", omittingEmptySubsequences: true)
            guard let first = columns.first else { continue }
            let machine = String(first)
            known.insert(machine)
            if machine == name, let range = line.range(of: "(alias of ") {
                let rest = line[range.upperBound...]
                if let close = rest.firstIndex(of: ")") {
                    return String(rest[..<close])
                }
            }
        }
        guard known.contains(name) else {
            throw VMTemplateError(.invalidArgument, "QEMU \(version) has no machine type '\(name)': see '\(path) -machine help' for the list (e.g. q35).")
        }
        return name
    }
}
