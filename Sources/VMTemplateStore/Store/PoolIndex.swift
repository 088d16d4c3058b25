import Foundation
import VMTemplateOS

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The warm pools of a store: how many members each template's pool should hold (`pools.json`),
/// and which members are ready to be handed out (`pools/TEMPLATE/ID`, one empty file each).
///
/// A member is handed out by renaming its file to a claim (``claim(_:template:)``): `rename`
/// succeeds for exactly one caller, so two concurrent `clone`s never get the same member, and a
/// hand-out never scans `clones/`. The record stays the truth about a member; the file only says
/// "take me", and a claimed ID is checked against its record (state `pooled`, this template and
/// its identity, its own QEMU alive) before use.
public struct PoolIndex: Sendable {
    public let store: TemplateStore

    public init(store: TemplateStore) {
        self.store = store
    }

    public var directory: String { "\(store.root)/pools" }
    var sizesPath: String { "\(store.root)/pools.json" }

    /// The most members one pool may hold.
    public static let maxPoolSize = 1024

    /// The size asked for each template's pool; entries that do not hold up are left out.
    public func sizes() -> [String: Int] {
        guard case .success(let sizes) = StoredJSON.read([String: Int].self, at: sizesPath, owner: store.ownerUID) else { return [:] }
        return sizes.filter { (try? EntityName($0.key)) != nil && (0...Self.maxPoolSize).contains($0.value) }
    }

    /// Sets (0: removes) the size of `template`'s pool.
    public func setSize(_ template: EntityName, _ size: Int) async throws {
        guard (0...Self.maxPoolSize).contains(size) else {
            throw VMTemplateError(.invalidArgument, "a pool holds 0 to \(Self.maxPoolSize) members, not \(size).")
        }
        let path = sizesPath
        try await store.withLock { locked in
            try locked.update([String: Int].self, at: path, default: [:]) { sizes in
                sizes = sizes.filter { (try? EntityName($0.key)) != nil && (0...Self.maxPoolSize).contains($0.value) }
                sizes[template.value] = size == 0 ? nil : size
            }
        }
    }

    func poolDirectory(_ template: EntityName) -> String { "\(directory)/\(template.value)" }

    /// The members of `template`'s pool that are ready, oldest first (they have waited longest).
    public func readyMembers(of template: EntityName) -> [String] {
        let directory = poolDirectory(template)
        return StoredJSON.entries(of: directory)
            .filter { (try? EntityName($0, kind: "clone ID")) != nil }
            .compactMap { id -> (String, Int64)? in
                var info = stat()
                guard lstat("\(directory)/\(id)", &info) == 0, (info.st_mode & S_IFMT) == S_IFREG, info.st_uid == store.ownerUID else { return nil }
                return (id, Int64(info.st_mtim.tv_sec) * 1_000_000_000 + Int64(info.st_mtim.tv_nsec))
            }
            .sorted { $0.1 < $1.1 }
            .map(\.0)
    }

    /// Puts member `id` in `template`'s pool, ready to be handed out.
    public func markReady(_ id: String, template: EntityName) throws {
        try store.requireWritable()
        for directory in [self.directory, poolDirectory(template)] where mkdir(directory, 0o755) != 0 && errno != EEXIST {
            throw VMTemplateError(.ioError, "cannot create '\(directory)': \(errnoText()).", cause: SystemCallError("mkdir"))
        }
        let fd = open("\(poolDirectory(template))/\(id)", O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644)
        guard fd >= 0 || errno == EEXIST else {
            throw VMTemplateError(.ioError, "cannot mark clone \(id) ready in the pool of '\(template)': \(errnoText()).", cause: SystemCallError("open"))
        }
        if fd >= 0 { close(fd) }
    }

    /// Takes member `id` out of `template`'s pool: its file is renamed to `.taken-ID-PID-START`
    /// (this process's PID and start time: a reused PID is not mistaken for it), which succeeds
    /// for exactly one caller and says who took it. The caller records the hand-out and
    /// then calls ``releaseClaim(_:template:)``; if it dies before that, ``staleClaims(of:)``
    /// finds the member again.
    @discardableResult
    public func claim(_ id: String, template: EntityName) -> Bool {
        guard store.mode == .readWrite, (try? EntityName(id, kind: "clone ID")) != nil else { return false }
        let directory = poolDirectory(template)
        return rename("\(directory)/\(id)", "\(directory)/\(Self.claimFileName(id))") == 0
    }

    /// This process's claim on `id`.
    static func claimFileName(_ id: String) -> String { ".taken-\(id)-\(ownClaimSuffix)" }

    /// `PID-START` of this process, read from /proc once: every claim and release uses it.
    private static let ownClaimSuffix: String = {
        let pid = getpid()
        return "\(pid)-\(ProcessIdentity.current(pid: pid)?.startTime ?? 0)"
    }()

    /// Forgets this process's claim on `id`, once its record says where the member went.
    public func releaseClaim(_ id: String, template: EntityName) {
        unlink("\(poolDirectory(template))/\(Self.claimFileName(id))")
    }

    /// Claims whose taker is gone: (member ID, the claim file's name).
    public func staleClaims(of template: EntityName) -> [(id: String, file: String)] {
        let directory = poolDirectory(template)
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return names.compactMap { name in
            guard name.hasPrefix(".taken-") else { return nil }
            let parts = name.dropFirst(".taken-".count).split(separator: "-")
            guard parts.count == 3, let pid = Int32(parts[1]), pid > 0, let start = UInt64(parts[2]),
                  (try? EntityName(String(parts[0]), kind: "clone ID")) != nil else { return nil }
            // The same process still alive (PID and start time): still being handed out.
            if ProcessIdentity(pid: pid, startTime: start).isAlive { return nil }
            return (String(parts[0]), name)
        }
    }

    /// Members somebody has claimed (alive or not).
    public func claimedMembers(of template: EntityName) -> Set<String> {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: poolDirectory(template))) ?? []
        return Set(names.compactMap { name in
            guard name.hasPrefix(".taken-") else { return nil }
            return name.dropFirst(".taken-".count).split(separator: "-").first.map(String.init)
        })
    }

    /// Puts a member whose claim went stale back in the pool (`file` from ``staleClaims(of:)``),
    /// or drops the claim when `restore` is false.
    public func resolveStaleClaim(_ file: String, id: String, template: EntityName, restore: Bool) {
        let directory = poolDirectory(template)
        if restore {
            rename("\(directory)/\(file)", "\(directory)/\(id)")
        } else {
            unlink("\(directory)/\(file)")
        }
    }

    /// Forgets `template`'s pool: its size and its ready list (the members themselves are clones,
    /// removed as such).
    public func remove(_ template: EntityName) async throws {
        try await setSize(template, 0)
        try? FileSystem.removeTree(path: poolDirectory(template))
    }
}

extension TemplateStore {
    /// The store's warm pools (``PoolIndex``).
    public var pools: PoolIndex { PoolIndex(store: self) }
}
