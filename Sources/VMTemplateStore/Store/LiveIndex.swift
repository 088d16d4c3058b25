import Foundation
import VMTemplateOS

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What admission needs to know about the live clones, without reading every record or every
/// `/proc` entry: `live.json` maps each clone's ID to the memory it commits against the budget.
///
/// An entry is made when a clone's directory is made and dropped when the directory goes, both
/// under the store lock, so the index holds every clone that exists and may hold more (a clone
/// whose QEMU died and that nobody has removed yet). It errs only on the side of refusing: when
/// it would refuse a clone, admission rebuilds it from the records and asks again
/// (``admit(_:excluding:)``), and `gc` rebuilds it too. A missing or unreadable
/// index is rebuilt on first use, so a store made before it needs nothing.
extension TemplateStore {
    var liveIndexPath: String { "\(root)/live.json" }

    /// The most entries the index is believed with: more than any host runs clones.
    static let maxLiveEntries = 1 << 16
}

/// `live.json`.
private struct LiveIndex: Codable {
    /// Clone ID to committed bytes.
    var clones: [String: UInt64]
}

/// The live index under the store lock: entries, admission, removal claims.
extension LockedStore {
    /// The committed bytes of the clones in the index; nil when it is missing or does not hold up.
    func readLiveIndex() -> [String: UInt64]? {
        guard case .success(let index) = StoredJSON.read(LiveIndex.self, at: store.liveIndexPath, owner: store.ownerUID),
              index.clones.count <= TemplateStore.maxLiveEntries,
              index.clones.keys.allSatisfy({ (try? EntityName($0, kind: "clone ID")) != nil }) else { return nil }
        return index.clones
    }

    /// Makes the index from the records, counting only the clones that are live now. 
    @discardableResult
    public func rebuildLiveIndex() throws -> [String: UInt64] {
        let listing = store.listClones()
        let old = readLiveIndex() ?? [:]
        var live: [String: UInt64] = [:]
        for record in listing.records where record.isLive { live[record.id] = record.committedBytes }
        // A directory whose record cannot be believed (damaged, or out of bounds) keeps what it
        // was entered with: only removing the directory frees its place, never spoiling a record.
        for id in listing.broken { if let committed = old[id] { live[id] = committed } }
        try writeLiveIndex(live)
        return live
    }

    private func writeLiveIndex(_ clones: [String: UInt64]) throws {
        // Not durable: every live clone dies with the machine, and a lost index is rebuilt.
        try StoredJSON.write(LiveIndex(clones: clones), to: store.liveIndexPath, mode: 0o644, durable: false)
    }

    /// Enters a clone being made.
    public func enterLive(_ id: String, committedBytes: UInt64) throws {
        var clones = try readLiveIndex() ?? rebuildLiveIndex()
        clones[id] = committedBytes
        try writeLiveIndex(clones)
    }

    /// Drops a clone whose directory is gone or going. A failure
    /// leaves an entry that can only make admission stricter, and the next rebuild drops it.
    public func leaveLive(_ id: String) {
        guard var clones = readLiveIndex() else { return }
        guard clones.removeValue(forKey: id) != nil else { return }
        try? writeLiveIndex(clones)
    }

    /// Throws `.limitExceeded` when one more commitment of `committedBytes` breaks the store's
    /// limits (``Admission/check(settings:live:newCommitted:)``), counting the live clones from the
    /// index: rebuilt from the records first when it is missing, and again before it would refuse
    /// (an entry of a clone that died is then dropped instead of refusing on its account).
    /// `excluding`: a live clone whose commitment this replaces.
    public func admit(_ committedBytes: UInt64, excluding id: String? = nil) throws {
        let settings = try store.settings()
        guard settings.maxClones != nil || settings.memoryBudgetBytes != nil else { return }
        func others(_ index: [String: UInt64]) -> [UInt64] { Array(index.filter { $0.key != id }.values) }
        // An index that admits is believed; one that refuses, or none, is made again from the
        // records, once, and that answer stands.
        if let indexed = readLiveIndex(),
           (try? Admission.check(settings: settings, live: others(indexed), newCommitted: committedBytes)) != nil {
            return
        }
        try Admission.check(settings: settings, live: others(try rebuildLiveIndex()), newCommitted: committedBytes)
    }

    /// Admits a live clone's new commitment (a higher copy-on-write limit) against the others'
    /// and enters it.
    public func recommit(_ id: String, committedBytes: UInt64) throws {
        try admit(committedBytes, excluding: id)
        try enterLive(id, committedBytes: committedBytes)
    }

    /// Takes the removal of clone `id` for this process: `clones/ID/.removing` made exclusively,
    /// naming this process (PID and start time). Throws `notFound` when
    /// the clone is gone or a live process (this one included) is removing it; a claim whose process is gone is
    /// taken over.
    public func claimRemoval(of id: String) throws {
        let path = store.cloneLayout(id).removalClaim
        let me = ProcessIdentity.current(pid: getpid())
        let text = "\(getpid()) \(me?.startTime ?? 0)"
        for _ in 0..<2 {
            let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
            if fd >= 0 {
                _ = write(fd, text, text.utf8.count)
                close(fd)
                return
            }
            guard errno == EEXIST else {
                if errno == ENOENT { break }
                throw VMTemplateError(.ioError, "cannot claim the removal of clone \(id): \(errnoText()).", cause: SystemCallError("open"))
            }
            let holder = (try? String(contentsOfFile: path, encoding: .utf8))?.split(separator: " ").compactMap { UInt64($0) } ?? []
            if holder.count == 2, let pid = Int32(exactly: holder[0]), ProcessIdentity(pid: pid, startTime: holder[1]).isAlive {
                // This very process too (two API requests for one clone): one removal each.
                throw VMTemplateError(.notFound, "clone \(id) is being removed by process \(pid): it is gone once that finishes.")
            }
            unlink(path)
        }
        throw VMTemplateError(.notFound, "no clone with ID \(id): it was removed meanwhile; see 'vmtemplate list'.")
    }

    /// Removes clone `id`'s directory, its index entry and (given its record) its names: under the
    /// store lock, so no `clone` can be reserving the same names meanwhile.
    /// `reason` is what the journal's `clone.removed` (or `pool.member-removed`) says.
    public func removeCloneDirectory(_ id: String, record: CloneRecord?, reason: String = "removed") throws {
        try FileSystem.removeTree(path: store.cloneDirectory(id))
        leaveLive(id)
        if let record { releaseNames(of: record) }
        let pooled = record.map { $0.state == .pooled || $0.state == .warming } ?? false
        var event = StoreEvent(pooled ? .poolMemberRemoved : .cloneRemoved, clone: id, name: record?.name, template: record?.template, reason: reason)
        event.fromPool = nil
        self.record(event)
    }
}

extension TemplateStore {
    /// Gives up this process's claim on removing clone `id` (the removal failed).
    public func releaseRemoval(of id: String) {
        unlink(cloneLayout(id).removalClaim)
    }

}
