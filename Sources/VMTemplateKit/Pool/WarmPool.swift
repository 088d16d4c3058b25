import Foundation
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Warm pools: clones restored ahead of demand, warmed, paused, and handed out by `clone` with a
/// `cont` (docs/pools.md).
///
/// A member is an ordinary clone record: `warming` while it is restored and warmed, then `pooled`.
/// Warming resumes the guest until it has answered its control channel (its clock and hostname
/// requests and a `ping`): a fresh QEMU under TCG translates every piece of code a resumed guest
/// runs, so the first answer takes 100–200 ms; a warmed member has done that once, and answers its
/// runtime's first request in ~15 ms. Then it is paused again and marked ready
/// (``TemplateStore/markReady(_:template:)``).
public struct WarmPool: Sendable {
    /// What restores members; its store is the pool's (a pool holds its own store's templates).
    public let launcher: CloneLauncher
    public var store: TemplateStore { launcher.store }
    var lifecycle: CloneLifecycle { CloneLifecycle(store: store) }

    public init(launcher: CloneLauncher) {
        self.launcher = launcher
    }

    /// The pools of `store`'s templates, members made with `explicitQEMU` (else the binary that
    /// made each template).
    public init(store: TemplateStore, explicitQEMU: String? = nil) {
        self.init(launcher: CloneLauncher(store: store, explicitQEMU: explicitQEMU))
    }

    /// One pool, as `pool ls` shows it.
    public struct Status: Sendable, Codable, Equatable {
        public var template: String
        /// Members asked for.
        public var size: Int
        /// Members ready to be handed out.
        public var ready: Int
        /// Members being restored and warmed.
        public var filling: Int

        public init(template: String, size: Int, ready: Int, filling: Int) {
            self.template = template
            self.size = size
            self.ready = ready
            self.filling = filling
        }
    }

    /// Every pool with a size, and every template with members left over. `records`: the store's
    /// clone records when the caller has just read them (a metrics scrape needs them too).
    public func status(records given: [CloneRecord]? = nil) -> [Status] {
        let sizes = store.pools.sizes()
        let records = given ?? store.clones().records
        var templates = Set(sizes.keys)
        for record in records where record.state == .pooled || record.state == .warming { templates.insert(record.template) }
        return templates.sorted().map { template in
            let members = records.filter { $0.template == template && $0.isLive }
            return Status(template: template, size: sizes[template] ?? 0,
                          ready: members.filter { $0.state == .pooled }.count,
                          filling: members.filter { $0.state == .warming }.count)
        }
    }

    /// The members of `template`'s pool that count: ready, or being warmed by a live filler.
    func members(of template: EntityName) -> [CloneRecord] {
        store.clones().records.filter { $0.template == template.value && $0.templateStore == nil && ($0.state == .pooled || $0.state == .warming) && $0.isLive }
    }

    /// Fills `template`'s pool up to its size, one member at a time; returns the members made.
    /// `limit` bounds how many are made in this call (the server makes one per round, so that
    /// filling never starves running clones of CPU).
    @discardableResult
    public func fill(_ template: EntityName, limit: Int = .max, timeout: Duration = .seconds(60)) async throws -> [CloneRecord] {
        var made: [CloneRecord] = []
        while made.count < limit {
            let size = store.pools.sizes()[template.value] ?? 0
            guard members(of: template).count < size else { break }
            try Task.checkCancellation()
            made.append(try await makeMember(template, timeout: timeout))
        }
        return made
    }

    /// Restores one member, warms it, pauses it, marks it ready.
    func makeMember(_ template: EntityName, timeout: Duration) async throws -> CloneRecord {
        let started = ContinuousClock.now
        let published = try launcher.template(template)
        var launched = try await launcher.launch(CloneRequest(template: template, timeout: timeout), from: published, state: .warming, started: started)
        do {
            defer { launched.qmp.close() }
            try await launched.qmp.cont()
            try await warm(launched.record, qmp: launched.qmp, manifest: published.manifest, timeout: timeout)
            launched.timings.resume = launched.lap.next()
            launched.timings.total = started.duration(to: .now).seconds
            var record = launched.record
            record.timings = launched.timings
            record.state = .pooled
            record.restoreSeconds = started.duration(to: .now).seconds
            // The pool may have been drained, or its template removed (and perhaps made again)
            // while this member warmed: then it is not listed, but goes like a clone that failed
            // to start. Checked, recorded and listed under the lock that template removal takes,
            // so a removal sees either no member or a listed one.
            let member = record
            try await store.withLock {
                guard (store.pools.sizes()[template.value] ?? 0) > 0,
                      (try? store.template(named: template))?.manifest.identity == member.templateDigest else {
                    throw VMTemplateError(.invalidState, "the pool of '\(template)' was drained or its template removed while member \(member.id) warmed.")
                }
                try store.save(member)
                try store.pools.markReady(member.id, template: template)
                $0.record(StoreEvent(.poolMemberReady, of: member))
            }
            return record
        } catch {
            await launcher.discard(launched)
            throw error
        }
    }

    /// Sets the size of `template`'s pool; a smaller size removes the ready members over it at
    /// once (0 drains the pool). Returns the members removed.
    @discardableResult
    public func setSize(_ template: EntityName, _ size: Int) async throws -> [String] {
        guard store.templateExists(template) else {
            throw VMTemplateError(.notFound, "no template named '\(template)' in this store: see 'vmtemplate list'.")
        }
        try await store.pools.setSize(template, size)
        return await drain(template, keeping: size)
    }

    /// Removes ready members of `template`'s pool beyond `keeping`, oldest first.
    @discardableResult
    public func drain(_ template: EntityName, keeping: Int = 0) async -> [String] {
        var removed: [String] = []
        var count = members(of: template).count
        for id in store.pools.readyMembers(of: template) where count > keeping {
            guard store.pools.claim(id, template: template) else { continue }
            // Only a member that is still one: a ready file never makes a running clone go.
            if let record = store.cloneRecord(id), record.state == .pooled, record.template == template.value {
                _ = try? await lifecycle.remove(record, grace: .milliseconds(500))
            }
            store.pools.releaseClaim(id, template: template)
            removed.append(id)
            count -= 1
        }
        return removed
    }

    /// Members that can never be handed out: pooled, alive, and of a template that is gone or was
    /// made again since (its identity differs from the one the member's record pins). Left by a
    /// filler that listed its member while the template was being removed.
    public func strays() -> [CloneRecord] {
        var identities: [String: String?] = [:]
        return store.clones().records.filter { record in
            guard record.state == .pooled, record.templateStore == nil, record.isLive else { return false }
            if identities[record.template] == nil {
                identities[record.template] = (try? EntityName(record.template)).flatMap { try? store.template(named: $0) }?.manifest.identity
            }
            return record.templateDigest == nil || identities[record.template] != .some(record.templateDigest)
        }
    }

    /// Stops pooled members that no pool may hand out: ``strays()``, or every pooled member of
    /// `template` (its pool removed with it). A member is re-read first: one handed out meanwhile
    /// is a running clone, not a member. Returns the IDs removed.
    @discardableResult
    public func removeStrays(of template: EntityName? = nil) async -> [String] {
        let candidates = template.map { name in
            store.clones().records.filter { $0.template == name.value && $0.templateStore == nil && $0.state == .pooled }
        } ?? strays()
        var removed: [String] = []
        for candidate in candidates {
            guard let record = store.cloneRecord(candidate.id), record.state == .pooled else { continue }
            if (try? await lifecycle.remove(record, grace: .milliseconds(500))) != nil { removed.append(record.id) }
        }
        return removed
    }

    /// What `gc` does for pools: ready entries whose member is gone are dropped, and a member
    /// whose hand-out was killed before its record said so goes back in its pool (it is still
    /// restored, warmed and paused: not lost).
    public func repair() {
        let records = store.clones().records
        for template in Set(store.pools.sizes().keys).union(records.filter { $0.state == .pooled }.map(\.template)) {
            guard let name = try? EntityName(template) else { continue }
            func stillPooled(_ id: String) -> Bool { records.contains { $0.id == id && $0.state == .pooled && $0.isLive } }
            for id in store.pools.readyMembers(of: name) where !stillPooled(id) {
                store.pools.claim(id, template: name)
                store.pools.releaseClaim(id, template: name)
            }
            for claim in store.pools.staleClaims(of: name) {
                store.pools.resolveStaleClaim(claim.file, id: claim.id, template: name, restore: stillPooled(claim.id))
            }
            // A filler killed between recording a member pooled and listing it. The snapshot above
            // may predate a hand-out that has since finished (and dropped its claim): only a record
            // read again now, after the files were listed, says the member is still pooled.
            let listed = Set(store.pools.readyMembers(of: name)).union(store.pools.claimedMembers(of: name))
            for record in records where record.template == template && record.templateStore == nil && record.state == .pooled && !listed.contains(record.id) {
                guard let fresh = store.cloneRecord(record.id), fresh.state == .pooled, fresh.isLive else { continue }
                try? store.pools.markReady(record.id, template: name)
            }
        }
    }
}
