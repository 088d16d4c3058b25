import Foundation
import VMTemplateOS

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The store while this process holds its lock: the only way to what must not interleave with
/// another process's change (names, the live index and admission, removal claims, clone
/// directories, read-change-write of a JSON file, publication).
///
/// Only ``TemplateStore/withLock(isolation:_:)`` makes one, and hands it to its body: an operation
/// that needs the lock is declared on this type, so calling it without the lock does not compile.
/// (The view could be kept past the body on purpose; nothing in the library does.)
public struct LockedStore: Sendable {
    public let store: TemplateStore

    fileprivate init(_ store: TemplateStore) {
        self.store = store
    }
}

extension TemplateStore {
    /// Runs `body` holding the store's exclusive lock (across processes, `flock(2)` on
    /// `ROOT/lock`), waiting at most ``lockTimeout``. The wait sleeps the task, never a
    /// cooperative thread; `body` itself is short and synchronous (files under the store only).
    /// The lock file is the owner's, mode 0600, so nobody else can hold it.
    @discardableResult
    public func withLock<T>(isolation: isolated (any Actor)? = #isolation, _ body: (LockedStore) throws -> T) async throws -> T {
        try requireWritable()
        let lock = try openLockFile(lockPath)
        return try await lock.withExclusive(waitingAtMost: Self.lockTimeout) { try body(LockedStore(self)) }
    }

    /// Changes one clone's record under the store lock (``LockedStore/updateClone(_:_:)``).
    @discardableResult
    public func updateClone(_ id: String, isolation: isolated (any Actor)? = #isolation, _ change: (inout CloneRecord) throws -> Void) async throws -> CloneRecord? {
        try await withLock { try $0.updateClone(id, change) }
    }

    /// Changes one clone's record and appends the event `report` makes of the record as written
    /// (nil: the clone is gone; no event when `report` gives none), under one hold of the lock, so
    /// the event stands in the journal where the change happened.
    @discardableResult
    public func updateClone(_ id: String, isolation: isolated (any Actor)? = #isolation, reporting report: (CloneRecord?) -> StoreEvent?, _ change: (inout CloneRecord) throws -> Void) async throws -> CloneRecord? {
        try await withLock { locked in
            let updated = try locked.updateClone(id, change)
            if let event = report(updated) { locked.record(event) }
            return updated
        }
    }
}
