import Foundation
import Synchronization
import VMTemplateOS
import VMTemplateQEMU

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The on-disk store of templates and clone records.
///
/// ```
/// ROOT/lock                       flock(2): serializes every change to the store
/// ROOT/settings.json              limits (StoreSettings)
/// ROOT/templates/NAME/            published, immutable: memory, state, manifest.json, boot.log (0444)
/// ROOT/staging/NAME/              a template being made; never listed; `gc` removes dead ones
/// ROOT/clones/ID/                 one directory per clone: record.json, sockets, logs
/// ROOT/names/NAME                 the ID of the clone named NAME (NameIndex.swift)
/// ROOT/live.json                  live clones and what they commit (LiveIndex.swift)
/// ROOT/pools.json, ROOT/pools/    warm pool sizes and ready members (PoolIndex.swift)
/// ROOT/serve.sock, scheduler.lock the server's socket, the one scheduler's lock
/// ```
/// (docs/architecture.md has the whole layout with modes.)
///
/// A template appears in `templates/` only by the rename of a complete staging directory, so a
/// reader never sees half a template, and a `create` killed at any point leaves nothing in `list`.
/// Every path is derived from this layout and a checked name, never read from a file.
public struct TemplateStore: Sendable {
    public let root: String
    /// The store's owner: the owner of its root directory. Only this user changes the store, and
    /// only directories and records this user owns are believed (see docs/architecture.md).
    public let ownerUID: uid_t
    public let mode: Mode
    public static let environmentVariable = "VMTEMPLATE_STORE"
    /// Where `clone` reads templates from when they are not in the clone's own store.
    public static let templateStoreEnvironmentVariable = "VMTEMPLATE_TEMPLATE_STORE"
    /// How long a command waits for the store lock before it says who holds it: 30 s, or
    /// `$VMTEMPLATE_LOCK_TIMEOUT` seconds (0.1 to 3600).
    public static var lockTimeout: Duration {
        if let text = ProcessInfo.processInfo.environment["VMTEMPLATE_LOCK_TIMEOUT"], let seconds = Double(text), seconds >= 0.1, seconds <= 3600 {
            return .seconds(fractional: seconds)
        }
        return .seconds(30)
    }

    public var templatesDirectory: String { "\(root)/templates" }
    public var stagingDirectory: String { "\(root)/staging" }
    public var clonesDirectory: String { "\(root)/clones" }
    /// What pulls keep between attempts: `pulls/blobs/HEX`, each a verified chunk.
    public var pullsDirectory: String { "\(root)/pulls" }
    public var pullBlobsDirectory: String { "\(pullsDirectory)/blobs" }
    /// A pulled chunk not used for this long is garbage (`gc`): an interrupted pull resumed
    /// within it fetches none of what it verified.
    public static let pullBlobLifetime: TimeInterval = 3600
    var lockPath: String { "\(root)/lock" }

    /// How a command uses the store.
    public enum Mode: Sendable {
        /// Reads only (`list`, `inspect`, `send`, `verify`, templates for `clone --template-store`):
        /// never creates anything, works on another user's store.
        case readOnly
        /// Changes it: creates the store if it is missing, and must be its owner.
        case readWrite
    }

    /// Opens the store at `root`; `.readWrite` creates it if needed (owned by this user, writable
    /// by nobody else) and refuses a store that belongs to another user.
    public init(root: String, mode: Mode = .readWrite) throws {
        let normalized = URL(fileURLWithPath: root).standardizedFileURL.path
        self.root = normalized
        self.mode = mode
        let me = geteuid()
        var info = stat()
        if stat(normalized, &info) == 0 {
            guard (info.st_mode & S_IFMT) == S_IFDIR else {
                throw VMTemplateError(.invalidArgument, "store path '\(normalized)' exists and is not a directory: pick another --store.")
            }
            ownerUID = info.st_uid
        } else {
            ownerUID = me
        }
        guard mode == .readWrite else { return }
        guard ownerUID == me else {
            throw VMTemplateError(.permissionDenied, "store '\(normalized)' belongs to uid \(ownerUID), and only its owner changes a store: use a store of your own (--store), and clone this store's templates with --template-store \(normalized).")
        }
        let layout: [(String, mode_t)] = [(normalized, 0o755), (templatesDirectory, 0o755), (stagingDirectory, 0o700), (clonesDirectory, 0o755)]
        for (directory, directoryMode) in layout {
            try Self.makeDirectory(directory, mode: directoryMode, owner: me)
        }
    }

    /// Makes the missing directories above `path` (0755), one by one, so that a failure names the
    /// directory and the reason (FileManager's errors are NSError dumps).
    private static func makeParents(of path: String) throws {
        let parent = FileSystem.split(path).directory
        guard parent != path, parent != "/", parent != ".", access(parent, F_OK) != 0 else { return }
        try makeParents(of: parent)
        guard mkdir(parent, 0o755) == 0 || errno == EEXIST else {
            throw FileSystem.error("create the store directory", path: parent, code: errno, permissionNeeded: "pass --store a directory you may write, or set VMTEMPLATE_STORE")
        }
    }

    /// Creates `path` with `mode`, or checks the one there: a directory (not a link) that `owner`
    /// owns. Write permission for anybody else is taken away (stores made before 0.2 had a
    /// world-writable `clones/`).
    private static func makeDirectory(_ path: String, mode: mode_t, owner: uid_t) throws {
        if mkdir(path, mode) != 0 {
            let code = errno
            if code == ENOENT {
                try makeParents(of: path)
                guard mkdir(path, mode) == 0 || errno == EEXIST else {
                    throw FileSystem.error("create the store directory", path: path, code: errno, permissionNeeded: "pass --store a directory you may write, or set VMTEMPLATE_STORE")
                }
            } else if code != EEXIST {
                throw FileSystem.error("create the store directory", path: path, code: code, permissionNeeded: "this user needs write permission on its parent directory")
            }
        }
        // Checked and changed through a descriptor opened without following links, so a link
        // planted at `path` meanwhile is refused, never followed.
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else {
            throw VMTemplateError(.invalidState, "'\(path)' in the store is not a directory (a link or a file someone put there): remove it, then try again.", cause: SystemCallError("open"))
        }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw FileSystem.error("inspect", path: path, code: errno, permissionNeeded: "") }
        guard info.st_uid == owner else {
            throw VMTemplateError(.permissionDenied, "'\(path)' belongs to uid \(info.st_uid), not to the store's owner (uid \(owner)): the store cannot be trusted; check who changed it.")
        }
        // A new directory gets exactly `mode`; an existing one loses write permission for others
        // (stores made before 0.2 had a world-writable clones/).
        let wanted = info.st_nlink <= 2 && info.st_mode & 0o7777 != mode ? mode : info.st_mode & 0o7755 & ~0o1000
        if info.st_mode & 0o7777 != wanted { _ = fchmod(fd, wanted) }
    }

    /// Refuses a change to a store opened read-only.
    func requireWritable() throws {
        guard mode == .readWrite else {
            throw VMTemplateError(.permissionDenied, "store '\(root)' was opened read-only: only its owner (uid \(ownerUID)) changes it.")
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

    /// Opens one of the store's lock files: the owner's, mode 0600. A lock file of another user is
    /// refused; one whose mode lets others open it (stores made before 0.2) is replaced by a fresh
    /// file, since a descriptor somebody opened earlier would keep working on the old one.
    public func openLockFile(_ path: String) throws -> FileLock {
        try requireWritable()
        let lock = try FileLock(path: path, mode: 0o600)
        let status = lock.status
        guard status.ownerUID == ownerUID else {
            throw VMTemplateError(.permissionDenied, "the lock file '\(path)' belongs to uid \(status.ownerUID), not to the store's owner: someone else made it to hold the store hostage; remove it (rm \(path)) and try again.")
        }
        guard status.mode & 0o077 != 0 else { return lock }
        let fresh = "\(path).new-\(getpid())"
        let fd = open(fresh, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw FileSystem.error("create", path: fresh, code: errno, permissionNeeded: "this user needs write permission on the store") }
        fchmod(fd, 0o600)
        close(fd)
        guard rename(fresh, path) == 0 else {
            unlink(fresh)
            throw FileSystem.error("replace", path: path, code: errno, permissionNeeded: "this user needs write permission on the store")
        }
        return try FileLock(path: path, mode: 0o600)
    }

    // MARK: Templates

    /// The files of a published template, by name.
    public func templateFiles(_ name: EntityName) -> TemplateFiles {
        TemplateFiles(directory: "\(templatesDirectory)/\(name)")
    }

    public func templateExists(_ name: EntityName) -> Bool {
        FileManager.default.fileExists(atPath: templateFiles(name).directory)
    }

    /// The published template `name`: its manifest and where its files are.
    ///
    /// Refuses a template whose manifest names another template: a directory copied or renamed
    /// by hand cannot be trusted.
    public func template(named name: EntityName) throws -> PublishedTemplate {
        let files = templateFiles(name)
        var info = stat()
        if lstat(files.directory, &info) == 0 {
            guard (info.st_mode & S_IFMT) == S_IFDIR, info.st_uid == ownerUID else {
                throw VMTemplateError(.permissionDenied, "template '\(name)' in '\(root)' is not a directory of the store's owner (uid \(ownerUID)): it is not to be trusted; check it and remove it by hand.")
            }
        }
        // A published manifest never changes: a long-lived process (`serve`) decodes it once per
        // file, recognised by inode, size and change time (a replaced or rewritten file is new).
        var manifestInfo = stat()
        let key = lstat(files.manifestPath, &manifestInfo) == 0 && (manifestInfo.st_mode & S_IFMT) == S_IFREG && manifestInfo.st_uid == ownerUID
            ? ManifestCache.Key(path: files.manifestPath, device: UInt64(manifestInfo.st_dev), inode: UInt64(manifestInfo.st_ino), size: Int64(manifestInfo.st_size), changed: Int64(manifestInfo.st_ctim.tv_sec) * 1_000_000_000 + Int64(manifestInfo.st_ctim.tv_nsec))
            : nil
        if let key, let cached = ManifestCache.shared.lookup(key) { return cached }
        let published = try decodeTemplate(name, files: files)
        if let key { ManifestCache.shared.store(published, for: key) }
        return published
    }

    private func decodeTemplate(_ name: EntityName, files: TemplateFiles) throws -> PublishedTemplate {
        let manifest: TemplateManifest
        switch StoredJSON.read(TemplateManifest.self, at: files.manifestPath, owner: ownerUID) {
        case .success(let decoded):
            manifest = decoded
        case .failure(.missing) where !templateExists(name):
            throw VMTemplateError(.notFound, "no template named '\(name)': see 'vmtemplate list' for the templates there are, or make it with 'vmtemplate create \(name) --recipe ...'.")
        case .failure(.unreadable(let error)) where error.code == EACCES:
            // A template made with --group: its files are that group's alone.
            throw VMTemplateError(.permissionDenied, "template '\(name)' may be read only by its group, which this user is not in: ask the store's owner to add you to it (see 'ls -l \(files.directory)').", cause: error)
        case .failure(.invalid(let reason)):
            throw VMTemplateError(.ioError, "the manifest of template '\(name)' cannot be read (\(reason)): the template is damaged or was made by a newer vmtemplate; remove it (vmtemplate rm-template \(name)) and create it again.")
        case .failure(let failure):
            throw VMTemplateError(.ioError, "template '\(name)' has no readable manifest.json (\(failure)): the template is damaged; remove it (vmtemplate rm-template \(name)) and create it again.")
        }
        guard manifest.memory.name == "memory", manifest.state.name == "state" else {
            throw VMTemplateError(.invalidState, "template '\(name)' has a manifest whose files are not 'memory' and 'state': it cannot be trusted; create it again.")
        }
        // Boot disks: names derived from their place and format, never taken from the file.
        let disks = manifest.disks ?? []
        guard disks.count == manifest.machine.bootDisks.count,
              zip(disks.indices, zip(disks, manifest.machine.bootDisks)).allSatisfy({ $1.0.name == TemplateManifest.diskFileName($0, format: $1.1.format) }),
              (try? GuestCommand.check(manifest.guestCommands ?? [], key: "guest_commands")) != nil else {
            throw VMTemplateError(.invalidState, "template '\(name)' has a manifest whose disks or guest commands are not what vmtemplate writes: it cannot be trusted; create it again.")
        }
        guard manifest.machine.memoryBytes <= CloneRecord.maxGuestMemoryBytes, manifest.memory.sizeBytes <= CloneRecord.maxGuestMemoryBytes else {
            throw VMTemplateError(.invalidState, "template '\(name)' has a manifest with an impossible memory size: it cannot be trusted; create it again.")
        }
        guard manifest.name == name.value else {
            throw VMTemplateError(.invalidState, "template directory '\(name)' holds the manifest of '\(manifest.name)': it was copied or renamed, so it cannot be trusted; create it again under this name.")
        }
        return PublishedTemplate(name: name, files: files, manifest: manifest)
    }

    /// Every published template, by name. Entries that cannot be read are reported in `problems`
    /// rather than failing the whole listing.
    public func templates() -> (templates: [PublishedTemplate], problems: [String]) {
        var templates: [PublishedTemplate] = []
        var problems: [String] = []
        for entry in StoredJSON.entries(of: templatesDirectory) {
            do {
                templates.append(try template(named: try EntityName(entry)))
            } catch let error as VMTemplateError {
                problems.append(error.message)
            } catch {
                problems.append("template '\(entry)': \(VMTemplateError.oneLine(error))")
            }
        }
        return (templates, problems)
    }

    // MARK: Staging

    /// Reserves `NAME` for a template being made: creates `staging/NAME` and records who owns it.
    ///
    /// A leftover of a `create` that was killed (its owner is gone) is reclaimed first: its QEMU is
    /// killed and the directory removed. A `create` of the same name that is still running wins.
    public func reserveStaging(_ name: EntityName) async throws -> StagingArea {
        let staging = StagingArea(name: name, directory: "\(stagingDirectory)/\(name)")
        let leftover: (StagingArea, StagingArea.Owner?)? = try await withLock { locked in
            if templateExists(name) {
                throw VMTemplateError(.exists, "template '\(name)' already exists: pick another name, or remove it first (vmtemplate rm-template \(name)).")
            }
            // Names are unique among clones and templates, so a name always says which one it is.
            if clones().records.contains(where: { $0.name == name.value }) {
                throw VMTemplateError(.exists, "'\(name)' is the name of a clone: give the template another name.")
            }
            guard FileManager.default.fileExists(atPath: staging.directory) else { return nil }
            let owner = staging.owner
            if let owner, owner.creator.isAlive {
                throw VMTemplateError(.busy, "template '\(name)' is being created right now by process \(owner.creator.pid): wait for it to finish, or pick another name.")
            }
            return (try locked.claimForDiscard(staging), owner)
        }
        if let (claimed, owner) = leftover {
            try await claimed.discard(owner: owner)
        }
        return try await withLock { _ in
            guard mkdir(staging.directory, 0o755) == 0 else {
                let code = errno
                if code == EEXIST {
                    throw VMTemplateError(.busy, "template '\(name)' is being created right now by another process: wait for it to finish, or pick another name.")
                }
                throw VMTemplateError(.ioError, "cannot create staging directory '\(staging.directory)': \(errnoText(code)).", cause: SystemCallError("mkdir", code: code))
            }
            try staging.writeOwner(qemu: nil, executable: nil)
            return staging
        }
    }

    /// Publishes a complete staging directory as `templates/NAME` with one rename.
    package func publish(_ staging: StagingArea, directoryMode: mode_t = 0o555) async throws {
        try await withLock { try $0.publish(staging, directoryMode: directoryMode) }
    }

    /// Removes what interrupted `create`s left in `staging/` (and stops the QEMU they left);
    /// anything whose creator still runs is left alone.
    public func collectStagingGarbage(into report: inout GarbageReport) async {
        var problems: [String] = []
        let claimed: [(StagingArea, StagingArea.Owner?)] = (try? await withLock { locked in
            let names = (try? FileManager.default.contentsOfDirectory(atPath: stagingDirectory)) ?? []
            return names.sorted().compactMap { entry -> (StagingArea, StagingArea.Owner?)? in
                let directory = "\(stagingDirectory)/\(entry)"
                // Moved aside by a `gc` or `create` that died before it finished the removal.
                if entry.hasPrefix(StagingArea.discardPrefix), let name = try? EntityName(String(entry.split(separator: "-", maxSplits: 2).last ?? "")) {
                    let aside = StagingArea(name: name, directory: directory)
                    return (aside, aside.owner)
                }
                guard let name = try? EntityName(entry) else {
                    problems.append("\(directory): not a template name; remove it by hand if it is not yours.")
                    return nil
                }
                let staging = StagingArea(name: name, directory: directory)
                let owner = staging.owner
                if let owner, owner.creator.isAlive { return nil }
                do {
                    return (try locked.claimForDiscard(staging), owner)
                } catch {
                    problems.append("\(directory): \(VMTemplateError.oneLine(error))")
                    return nil
                }
            }
        }) ?? []
        report.problems += problems
        for (staging, owner) in claimed {
            do {
                if let pid = try await staging.discard(owner: owner) { report.stoppedQEMU.append(pid) }
                report.removedStaging.append(staging.name.value)
            } catch {
                report.problems.append("\(staging.directory): \(VMTemplateError.oneLine(error))")
            }
        }
    }
}

extension TemplateStore {
    /// Removes pulled chunks (and partial downloads) that no pull has touched for
    /// ``pullBlobLifetime``: what interrupted pulls left. Only regular files of this store's
    /// owner, never through a link.
    public func collectPullGarbage(into report: inout GarbageReport, now: Date = Date()) {
        for name in (try? FileManager.default.contentsOfDirectory(atPath: pullBlobsDirectory)) ?? [] {
            let path = "\(pullBlobsDirectory)/\(name)"
            var info = stat()
            guard lstat(path, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG, info.st_uid == ownerUID,
                  now.timeIntervalSince1970 - Double(info.st_mtim.tv_sec) > Self.pullBlobLifetime else { continue }
            if unlink(path) == 0 { report.removedFiles.append(path) }
        }
    }
}

/// What `gc` did.
public struct GarbageReport: Sendable, Codable, Equatable {
    public var removedStaging: [String] = []
    public var stoppedQEMU: [Int32] = []
    public var removedClones: [String] = []
    /// Litter of killed commands: name-index entries of clones that are gone, the private
    /// directories and sockets of servers that no longer run.
    public var removedFiles: [String] = []
    public var problems: [String] = []

    public init() {}

    enum CodingKeys: String, CodingKey {
        case removedStaging = "removed_staging"
        case stoppedQEMU = "killed_processes"
        case removedClones = "removed_clones"
        case removedFiles = "removed_files"
        case problems
    }

    public var isEmpty: Bool { removedStaging.isEmpty && stoppedQEMU.isEmpty && removedClones.isEmpty && removedFiles.isEmpty }
}

/// Where a template's files are, in `templates/NAME` or `staging/NAME` alike.
public struct TemplateFiles: Sendable, Equatable {
    public let directory: String

    public init(directory: String) {
        self.directory = directory
    }

    public var memoryPath: String { "\(directory)/memory" }
    public var statePath: String { "\(directory)/state" }
    public var manifestPath: String { "\(directory)/manifest.json" }
    public var bootLogPath: String { "\(directory)/boot.log" }
}

/// A published template: its name, its files and its manifest. What `clone` needs of a template,
/// so nobody rebuilds its paths from a name.
public struct PublishedTemplate: Sendable {
    public let name: EntityName
    public let files: TemplateFiles
    public let manifest: TemplateManifest

    public var directory: String { files.directory }
    public var memoryPath: String { files.memoryPath }
    public var statePath: String { files.statePath }
    /// The template's copies of its boot disks, in order.
    public var diskPaths: [String] { (manifest.disks ?? []).map { "\(directory)/\($0.name)" } }

    /// Whether a caller (uid and every group it is in) may read this template: its manifest, RAM
    /// and device state, by their modes and owners as the kernel would decide for that caller. A
    /// server that clones with its own rights asks this first, so that it clones nothing its
    /// caller could not (a `--group` template is its group's alone).
    public func isReadable(byUID uid: uid_t, groups: Set<gid_t>) -> Bool {
        guard uid != 0 else { return true }
        return ([files.manifestPath, memoryPath, statePath] + diskPaths).allSatisfy { path in
            var info = stat()
            guard lstat(path, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG else { return false }
            if info.st_uid == uid { return info.st_mode & 0o400 != 0 }
            if groups.contains(info.st_gid) { return info.st_mode & 0o040 != 0 }
            return info.st_mode & 0o004 != 0
        }
    }
}

/// A template being made: `staging/NAME`, with `owner.json` naming the creating process and its QEMU.
public struct StagingArea: Sendable {
    public let name: EntityName
    public let directory: String

    public var files: TemplateFiles { TemplateFiles(directory: directory) }
    public var paths: InstancePaths { InstancePaths(directory: directory) }
    var ownerPath: String { "\(directory)/owner.json" }
    /// Staging areas moved aside to be removed are named `.discard-RANDOM-NAME`.
    static let discardPrefix = ".discard-"

    /// The `-name` of the QEMU that boots this template: how `gc` recognises it.
    public var qemuName: String { "vmtemplate-create-\(name)" }

    package struct Owner: Codable, Sendable {
        var creator: ProcessIdentity
        var qemu: ProcessIdentity?
        var qemuExecutable: String?

        enum CodingKeys: String, CodingKey {
            case creator, qemu
            case qemuExecutable = "qemu_executable"
        }
    }

    /// Records this process as the creator and, once started, the template's QEMU, so that `gc`
    /// can tell a live `create` from a dead one and stop what a dead one left running.
    public func writeOwner(qemu: ProcessIdentity?, executable: String?) throws {
        guard let creator = ProcessIdentity.current(pid: getpid()) else {
            throw VMTemplateError(.internalError, "cannot read this process's own /proc entry: is /proc mounted?")
        }
        try StoredJSON.write(Owner(creator: creator, qemu: qemu, qemuExecutable: executable), to: ownerPath)
    }

    var owner: Owner? {
        try? StoredJSON.read(Owner.self, at: ownerPath).get()
    }

    /// Stops the staging area's QEMU (only if it is the QEMU `owner` names, checked by
    /// ``QEMUInstance/attach(identity:name:qmpSocket:logPath:executable:)``) and removes the
    /// directory. Returns the PID of the QEMU it stopped.
    @discardableResult
    func discard(owner: Owner?) async throws -> Int32? {
        var stopped: Int32?
        if let identity = owner?.qemu {
            let paths = self.paths
            if case .running(let qemu) = QEMUInstance.attach(identity: identity, name: qemuName, qmpSocket: paths.qmpSocket, logPath: paths.qemuLog, executable: owner?.qemuExecutable) {
                try await qemu.stop(grace: .milliseconds(500), politely: false)
                stopped = qemu.pid
            }
        }
        try FileSystem.removeTree(path: directory)
        return stopped
    }

    /// Removes this staging area (on any failure of `create`, after its QEMU was stopped).
    public func discard() {
        try? FileSystem.removeTree(path: directory)
    }
}

/// Manifests decoded in this process, by the identity of their file.
final class ManifestCache: Sendable {
    struct Key: Hashable, Sendable {
        var path: String
        var device: UInt64
        var inode: UInt64
        var size: Int64
        var changed: Int64
    }

    static let shared = ManifestCache()
    /// Bounded: a long-lived server sees templates come and go.
    private static let capacity = 256
    private let entries = Mutex<[Key: PublishedTemplate]>([:])

    func lookup(_ key: Key) -> PublishedTemplate? { entries.withLock { $0[key] } }

    func store(_ template: PublishedTemplate, for key: Key) {
        entries.withLock { entries in
            if entries.count >= Self.capacity { entries.removeAll() }
            entries[key] = template
        }
    }
}

/// Staging and publication, under the store lock.
extension LockedStore {
    /// Moves a dead staging area aside so that stopping its QEMU and removing it can happen
    /// without the lock, and a new `create` of the same name cannot be caught by it.
    func claimForDiscard(_ staging: StagingArea) throws -> StagingArea {
        let aside = "\(store.stagingDirectory)/\(StagingArea.discardPrefix)\(String(UInt32.random(in: 0...UInt32.max), radix: 16))-\(staging.name)"
        guard rename(staging.directory, aside) == 0 else {
            throw VMTemplateError(.ioError, "cannot move the leftover staging area '\(staging.directory)' aside: \(errnoText()).", cause: SystemCallError("rename"))
        }
        return StagingArea(name: staging.name, directory: aside)
    }

    /// Publishes a complete staging directory as `templates/NAME` with one rename.
    func publish(_ staging: StagingArea, directoryMode: mode_t) throws {
        let target = store.templateFiles(staging.name).directory
        if store.templateExists(staging.name) {
            throw VMTemplateError(.exists, "template '\(staging.name)' was created by another process meanwhile: pick another name.")
        }
        try FileSystem.fsyncDirectory(path: staging.directory)
        guard rename(staging.directory, target) == 0 else {
            throw VMTemplateError(.ioError, "cannot publish template '\(staging.name)': rename to '\(target)' failed: \(errnoText()).", cause: SystemCallError("rename"))
        }
        // Read-only directory too: nobody but root can add or remove files in a template.
        chmod(target, directoryMode)
        try FileSystem.fsyncDirectory(path: store.templatesDirectory)
        try FileSystem.fsyncDirectory(path: store.stagingDirectory)
        record(StoreEvent(.templateAdded, template: staging.name.value))
    }
}
