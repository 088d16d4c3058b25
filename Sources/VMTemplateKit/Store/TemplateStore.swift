import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The on-disk store of templates (and, later, clone records).
///
/// ```
/// ROOT/lock                       flock(2): serializes every change to the store
/// ROOT/templates/NAME/            published, immutable: memory, state, manifest.json, boot.log (0444)
/// ROOT/staging/NAME/              a template being made; never listed; `gc` removes dead ones
/// ROOT/clones/ID/                 one directory per clone
/// ```
///
/// A template appears in `templates/` only by the rename of a complete staging directory, so a
/// reader never sees half a template, and a `create` killed at any point leaves nothing in `list`.
public struct TemplateStore: Sendable {
    public let root: String
    public static let environmentVariable = "VMTEMPLATE_STORE"

    public var templatesDirectory: String { "\(root)/templates" }
    public var stagingDirectory: String { "\(root)/staging" }
    public var clonesDirectory: String { "\(root)/clones" }
    var lockPath: String { "\(root)/lock" }

    /// Opens (and if needed creates) the store at `root`.
    public init(root: String) throws {
        let normalized = URL(fileURLWithPath: root).standardizedFileURL.path
        self.root = normalized
        for directory in [normalized, templatesDirectory, stagingDirectory] {
            try Self.makeDirectory(directory)
        }
        // Sticky and world-writable, like /tmp: any user who can read a template may clone it,
        // and only a clone's owner (or root) can remove its directory.
        if !FileManager.default.fileExists(atPath: clonesDirectory) {
            try Self.makeDirectory(clonesDirectory)
            chmod(clonesDirectory, 0o1777)
        }
    }

    /// `--store`, else `$VMTEMPLATE_STORE`, else `/var/lib/vmtemplate` for root and
    /// `$XDG_DATA_HOME/vmtemplate` (or `~/.local/share/vmtemplate`) for everyone else.
    public static func defaultRoot(explicit: String?, environment: [String: String] = ProcessInfo.processInfo.environment) -> String {
        if let explicit, !explicit.isEmpty { return explicit }
        if let fromEnvironment = environment[environmentVariable], !fromEnvironment.isEmpty { return fromEnvironment }
        if getuid() == 0 { return "/var/lib/vmtemplate" }
        if let dataHome = environment["XDG_DATA_HOME"], !dataHome.isEmpty { return "\(dataHome)/vmtemplate" }
        return "\(environment["HOME"] ?? NSHomeDirectory())/.local/share/vmtemplate"
    }

    private static func makeDirectory(_ path: String) throws {
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) {
            guard isDirectory.boolValue else {
                throw VMTemplateError(.invalidArgument, "store path '\(path)' exists and is not a directory: pick another --store.")
            }
            return
        }
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
        } catch {
            throw VMTemplateError(.ioError, "cannot create store directory '\(path)': check its parent's permissions or pick another --store.", cause: "\(error)")
        }
    }

    /// Runs `body` holding the store's exclusive lock (across processes).
    public func withLock<T>(_ body: () throws -> T) throws -> T {
        let lock = try FileLock(path: lockPath)
        return try lock.withExclusive(body)
    }

    // MARK: Templates

    public func templateDirectory(_ name: EntityName) -> String { "\(templatesDirectory)/\(name)" }

    public func templateExists(_ name: EntityName) -> Bool {
        FileManager.default.fileExists(atPath: templateDirectory(name))
    }

    /// The manifest of a published template.
    public func manifest(of name: EntityName) throws -> TemplateManifest {
        let path = "\(templateDirectory(name))/manifest.json"
        guard let data = FileManager.default.contents(atPath: path) else {
            if !templateExists(name) {
                throw VMTemplateError(.notFound, "no template named '\(name)': see 'vmtemplate list' for the templates there are, or make it with 'vmtemplate create \(name) --recipe ...'.")
            }
            throw VMTemplateError(.ioError, "template '\(name)' has no readable manifest.json: the template is damaged; remove it and create it again.")
        }
        do {
            return try JSONCoding.decoder().decode(TemplateManifest.self, from: data)
        } catch {
            throw VMTemplateError(.ioError, "manifest of template '\(name)' is not valid: \(JSONErrorText.describe(error)). The template is damaged or was made by a newer vmtemplate.")
        }
    }

    /// Every published template, by name. Entries that cannot be read are reported in `problems`
    /// rather than failing the whole listing.
    public func templates() -> (manifests: [TemplateManifest], problems: [String]) {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: templatesDirectory)) ?? []
        var manifests: [TemplateManifest] = []
        var problems: [String] = []
        for raw in names.sorted() {
            guard let name = try? EntityName(raw) else { continue }
            do {
                manifests.append(try manifest(of: name))
            } catch let error as VMTemplateError {
                problems.append(error.message)
            } catch {
                problems.append("template '\(raw)': \(error)")
            }
        }
        return (manifests, problems)
    }

    // MARK: Staging

    /// Reserves `NAME` for a template being made: creates `staging/NAME` and records who owns it.
    ///
    /// A leftover of a `create` that was killed (its owner is gone) is reclaimed first: its QEMU is
    /// killed and the directory removed. A `create` of the same name that is still running wins.
    public func reserveStaging(_ name: EntityName) throws -> StagingArea {
        try withLock {
            if templateExists(name) {
                throw VMTemplateError(.exists, "template '\(name)' already exists: pick another name, or remove it first.")
            }
            let directory = "\(stagingDirectory)/\(name)"
            if FileManager.default.fileExists(atPath: directory) {
                if let owner = StagingArea.readOwner(directory: directory), owner.creator.isAlive {
                    throw VMTemplateError(.busy, "template '\(name)' is being created right now by process \(owner.creator.pid): wait for it to finish, or pick another name.")
                }
                try StagingArea.discard(directory: directory)
            }
            guard mkdir(directory, 0o755) == 0 else {
                throw VMTemplateError(.ioError, "cannot create staging directory '\(directory)': \(errnoText()).")
            }
            let staging = StagingArea(name: name, directory: directory)
            try staging.writeOwner(qemu: nil)
            return staging
        }
    }

    /// Publishes a complete staging directory as `templates/NAME` with one rename.
    func publish(_ staging: StagingArea) throws {
        try withLock {
            let target = templateDirectory(staging.name)
            if templateExists(staging.name) {
                throw VMTemplateError(.exists, "template '\(staging.name)' was created by another process meanwhile: pick another name.")
            }
            try FileSystem.fsyncDirectory(path: staging.directory)
            guard rename(staging.directory, target) == 0 else {
                throw VMTemplateError(.ioError, "cannot publish template '\(staging.name)': rename to '\(target)' failed: \(errnoText()).")
            }
            // Read-only directory too: nobody but root can add or remove files in a template.
            chmod(target, 0o555)
            try FileSystem.fsyncDirectory(path: templatesDirectory)
            try FileSystem.fsyncDirectory(path: stagingDirectory)
        }
    }

    // MARK: Garbage collection

    /// What `gc` did.
    public struct GarbageReport: Sendable, Codable, Equatable {
        public var removedStaging: [String] = []
        public var killedProcesses: [Int32] = []
        public var removedClones: [String] = []
        public var problems: [String] = []

        enum CodingKeys: String, CodingKey {
            case removedStaging = "removed_staging"
            case killedProcesses = "killed_processes"
            case removedClones = "removed_clones"
            case problems
        }
    }

    /// Removes leftovers of interrupted `create`s and `clone`s (killing the QEMU they left) and
    /// the records of clones whose QEMU has exited. Anything whose creator still runs is left alone.
    public func collectGarbage() throws -> GarbageReport {
        try withLock {
            var report = GarbageReport()
            let entries = (try? FileManager.default.contentsOfDirectory(atPath: stagingDirectory)) ?? []
            for entry in entries.sorted() {
                let directory = "\(stagingDirectory)/\(entry)"
                let owner = StagingArea.readOwner(directory: directory)
                if let owner, owner.creator.isAlive { continue }
                if let qemu = owner?.qemu, qemu.isAlive { report.killedProcesses.append(qemu.pid) }
                do {
                    try StagingArea.discard(directory: directory)
                    report.removedStaging.append(entry)
                } catch {
                    report.problems.append("\(directory): \(error)")
                }
            }
            let cloneEntries = (try? FileManager.default.contentsOfDirectory(atPath: clonesDirectory)) ?? []
            for entry in cloneEntries.sorted() where !entry.hasPrefix(".") {
                let directory = cloneDirectory(entry)
                // Records are written under this lock together with their directory, so a
                // directory without a readable record is debris.
                let record = FileManager.default.contents(atPath: recordPath(entry)).flatMap { try? JSONCoding.decoder().decode(CloneRecord.self, from: $0) }
                if let record {
                    let qemuAlive = record.qemu?.isAlive ?? false
                    let interrupted = record.state == .starting && record.creator?.isAlive != true
                    guard !qemuAlive || interrupted else { continue }
                    if record.state == .starting && record.creator?.isAlive == true { continue }
                    if qemuAlive, let qemu = record.qemu {
                        kill(qemu.pid, SIGKILL)
                        report.killedProcesses.append(qemu.pid)
                        let deadline = ContinuousClock.now + .seconds(5)
                        while qemu.isAlive && ContinuousClock.now < deadline { usleep(2000) }
                    }
                }
                do {
                    try FileSystem.removeTree(path: directory)
                    report.removedClones.append(entry)
                } catch {
                    report.problems.append("\(directory): \(error)")
                }
            }
            return report
        }
    }
}

/// A template being made: `staging/NAME`, with `owner.json` naming the creating process and its QEMU.
public struct StagingArea: Sendable {
    public let name: EntityName
    public let directory: String

    public var memoryPath: String { "\(directory)/memory" }
    public var statePath: String { "\(directory)/state" }
    public var manifestPath: String { "\(directory)/manifest.json" }
    public var paths: InstancePaths { InstancePaths(directory: directory) }

    struct Owner: Codable {
        var creator: ProcessIdentity
        var qemu: ProcessIdentity?
    }

    /// Records this process as the creator and, once started, the template's QEMU, so that `gc`
    /// can tell a live `create` from a dead one and kill what a dead one left running.
    func writeOwner(qemu: ProcessIdentity?) throws {
        guard let creator = ProcessIdentity.current(pid: getpid()) else {
            throw VMTemplateError(.internalError, "cannot read this process's own /proc entry: is /proc mounted?")
        }
        try FileSystem.writeFileAtomically(path: "\(directory)/owner.json", data: try JSONCoding.encode(Owner(creator: creator, qemu: qemu)), mode: 0o644)
    }

    static func readOwner(directory: String) -> Owner? {
        guard let data = FileManager.default.contents(atPath: "\(directory)/owner.json") else { return nil }
        return try? JSONCoding.decoder().decode(Owner.self, from: data)
    }

    /// Kills the staging area's QEMU (if it still runs) and removes the directory.
    static func discard(directory: String) throws {
        if let qemu = readOwner(directory: directory)?.qemu, qemu.isAlive {
            kill(qemu.pid, SIGKILL)
            let deadline = ContinuousClock.now + .seconds(5)
            while qemu.isAlive && ContinuousClock.now < deadline { usleep(2000) }
        }
        try FileSystem.removeTree(path: directory)
    }

    /// Removes this staging area (on any failure of `create`).
    func discard() {
        try? Self.discard(directory: directory)
    }
}
