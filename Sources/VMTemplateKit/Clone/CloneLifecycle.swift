import Foundation
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

/// A running clone's life after `clone`: its state, resume, removal, and the clean-up `gc` does.
extension CloneEngine {
    /// The clone's QEMU, if the process the record names is still running *and* is this clone's
    /// QEMU (``QEMUInstance/attach(identity:name:qmpSocket:logPath:executable:)``). The only way
    /// to a clone's QEMU that may signal it.
    public func qemu(of record: CloneRecord) -> QEMUInstance.Attachment {
        guard let identity = record.qemu else { return .exited }
        let paths = store.clonePaths(record.id)
        return QEMUInstance.attach(identity: identity, name: CloneRecord.qemuName(id: record.id), qmpSocket: paths.qmpSocket, logPath: paths.qemuLog, executable: record.qemuExecutable)
    }

    /// The clone's state right now: `exited` when its QEMU is gone (PID and start time must both
    /// match), else what QMP says, or `unresponsive` when QMP does not answer within `timeout`.
    public func liveState(of record: CloneRecord, timeout: Duration = .milliseconds(500)) async -> CloneState {
        guard let qemu = record.qemu else {
            return record.creator?.isAlive == true ? record.state : .exited
        }
        guard qemu.isAlive else { return .exited }
        if record.isBeingSetUp { return record.creator?.isAlive == true ? record.state : .unresponsive }
        do {
            let qmp = try await QMPClient.connect(socketPath: store.clonePaths(record.id).qmpSocket, timeout: timeout, isPeerAlive: { qemu.isAlive })
            defer { qmp.close() }
            let status = try await qmp.queryStatus()
            if record.state == .pooled && !status.running { return .pooled }
            return status.running ? .running : .paused
        } catch let error as VMTemplateError where (error.cause as? SystemCallError)?.code == EACCES {
            // Another user's clone: its sockets are its owner's alone.
            _ = error
            return .notYours
        } catch {
            return qemu.isAlive ? .unresponsive : .exited
        }
    }

    /// Why a clone is nobody's to talk to or resume yet, or nil: a warm-pool member (paused until
    /// a `clone` hands it out), or a clone still being started.
    public static func refusalBeforeHandOut(_ record: CloneRecord) -> VMTemplateError? {
        switch record.state {
        case .pooled, .warming:
            VMTemplateError(.invalidState, "clone \(record.id) is a member of the warm pool of '\(record.template)', not handed out: 'vmtemplate clone \(record.template)' hands it out.")
        case .starting:
            VMTemplateError(.invalidState, "clone \(record.id) is still being started: wait until its 'vmtemplate clone' has returned.")
        default:
            nil
        }
    }

    /// Stops a clone's QEMU with the instance's ladder (QMP `quit`, SIGTERM, SIGKILL after `grace`
    /// each) and removes its directory and record. Returns how it was stopped.
    ///
    /// Removal is decided once: the first caller takes the clone's removal claim under the store
    /// lock; a concurrent caller (another `rm`, the API) is told the clone is not found, as it
    /// will be, so exactly one reports the removal.
    @discardableResult
    public func remove(_ record: CloneRecord, grace: Duration = .seconds(3)) async throws -> QEMUInstance.StopResult {
        try await store.withLock { try store.claimRemoval(of: record.id) }
        do {
            return try await stopAndRemove(record, grace: grace)
        } catch {
            // Not removed: the next caller may try again.
            store.releaseRemoval(of: record.id)
            throw error
        }
    }

    private func stopAndRemove(_ record: CloneRecord, grace: Duration) async throws -> QEMUInstance.StopResult {
        var how = QEMUInstance.StopResult.alreadyExited
        switch qemu(of: record) {
        case .running(let instance):
            how = try await instance.stop(grace: grace)
        case .exited:
            break
        case .notThisQEMU(let reason):
            throw VMTemplateError(.invalidState, "clone \(record.id) names process \(record.qemu?.pid ?? 0), which is not its QEMU (\(reason)): nothing was stopped or removed; check the record by hand.")
        }
        try await store.withLock {
            do {
                try store.removeCloneDirectory(record.id, record: record)
            } catch let error as VMTemplateError {
                throw VMTemplateError(.ioError, "clone \(record.id) stopped but its directory could not be removed: \(error.message)", cause: error.cause)
            }
        }
        return how
    }

    /// Continues a paused clone (QMP `cont`), optionally with a new copy-on-write limit so the
    /// scheduler does not pause it again at once.
    public func resume(_ record: CloneRecord, cowLimitBytes: UInt64? = nil) async throws -> CloneRecord {
        // A pool member resumed by hand would run outside its pool, yet still be handed out.
        if let refusal = Self.refusalBeforeHandOut(record) { throw refusal }
        guard case .running(let qemu) = qemu(of: record) else {
            throw VMTemplateError(.invalidState, "clone \(record.id) has exited and cannot be resumed: remove it (vmtemplate rm) and clone again.")
        }
        try Admission.checkLimit(cowLimitBytes)
        let limit = cowLimitBytes ?? record.cowLimitBytes
        if let limit, let usage = try? CloneMemoryUsage.measure(pid: qemu.pid, templateFile: record.memoryFile), usage.copyOnWriteBytes > limit {
            throw VMTemplateError(.limitExceeded, "clone \(record.id) uses \(ByteSize(bytes: usage.copyOnWriteBytes)) of copy-on-write, over its limit of \(ByteSize(bytes: limit)): the scheduler would pause it again. Resume it with a higher --cow-limit, or remove it.")
        }
        if let cowLimitBytes {
            // A higher limit is a bigger commitment: admitted like a new clone, and entered in
            // the live index before the guest may use it.
            let committed = Admission.committedBytes(guestMemory: record.guestMemoryBytes ?? cowLimitBytes, cowLimit: cowLimitBytes)
            try await store.withLock { try store.recommit(record.id, committedBytes: max(committed, record.committedBytes)) }
        }
        let qmp = try await qemu.connectQMP(timeout: .seconds(5), phase: "resume")
        defer { qmp.close() }
        try await qmp.cont()
        return try store.updateClone(record.id) { updated in
            updated.state = .running
            updated.pausedBy = nil
            if let cowLimitBytes { updated.cowLimitBytes = cowLimitBytes }
        } ?? record
    }

    /// Pauses a running clone (QMP `stop`) for its user: its guest freezes, its memory stays, and
    /// the record says who paused it (`paused_by: user`), so `list` and `inspect` tell a user's
    /// pause from the scheduler's. ``resume(_:cowLimitBytes:)`` continues it.
    public func pause(_ record: CloneRecord) async throws -> CloneRecord {
        if let refusal = Self.refusalBeforeHandOut(record) { throw refusal }
        guard case .running(let qemu) = qemu(of: record) else {
            throw VMTemplateError(.invalidState, "clone \(record.id) has exited and cannot be paused: remove it (vmtemplate rm \(record.id)).")
        }
        let qmp = try await qemu.connectQMP(timeout: .seconds(5), phase: "pause")
        defer { qmp.close() }
        try await qmp.stop()
        return try store.updateClone(record.id) { updated in
            updated.state = .paused
            updated.pausedBy = .user
        } ?? record
    }

    /// `gc`: what interrupted `create`s left in staging (``TemplateStore/collectStagingGarbage(into:)``)
    /// and the clones that are over (``collectCloneGarbage(into:)``).
    public func collectGarbage() async -> GarbageReport {
        var report = GarbageReport()
        await store.collectStagingGarbage(into: &report)
        await collectCloneGarbage(into: &report)
        let pool = WarmPool(engine: self)
        report.removedClones += await pool.removeStrays()
        pool.repair()
        do {
            report.removedFiles += try await store.withLock {
                _ = try store.rebuildLiveIndex()
                return store.pruneNameIndex()
            }
        } catch {
            report.problems.append("\(store.root)/live.json: \(VMTemplateError.oneLine(error))")
        }
        // A server killed with the default socket: its private directory and socket.
        report.removedFiles += ServerFiles.removeStale(beside: "\(store.root)/serve.sock")
        return report
    }

    /// Removes clones that are over: those whose QEMU has exited, those a `clone` was interrupted
    /// setting up (stopping the QEMU it left), and directories without a readable record (stopping
    /// a QEMU that runs under the clone's `-name`, found through `/proc`). A clone whose creator
    /// still runs is left alone.
    public func collectCloneGarbage(into report: inout GarbageReport) async {
        for snapshot in store.clones().records {
            var record = snapshot
            if record.isBeingSetUp {
                guard record.creator?.isAlive != true else { continue }
                // The creator is gone, so the record can no longer change; but the snapshot may
                // predate its last write (a `clone` that finished and exited after the listing).
                // Read again, now that nothing will write it.
                guard let fresh = store.cloneRecord(record.id) else { continue }
                record = fresh
            }
            let interrupted = record.isBeingSetUp
            switch qemu(of: record) {
            case .running(let instance):
                guard interrupted else { continue }
                do {
                    try await instance.stop(grace: .milliseconds(500), politely: false)
                    report.stoppedQEMU.append(instance.pid)
                } catch {
                    report.problems.append("clone \(record.id): \(VMTemplateError.oneLine(error))")
                    continue
                }
            case .exited:
                // A `clone` killed between spawning QEMU and recording it: found by its -name.
                if interrupted, !(await stopQEMU(named: record.id, into: &report)) { continue }
            case .notThisQEMU(let reason):
                if record.qemu?.isAlive == true, !interrupted { continue }
                report.problems.append("clone \(record.id): its record names a process that is not its QEMU (\(reason)); nothing was signalled.")
            }
            await removeDirectory(of: record.id, into: &report)
        }
        // Listed under the lock: `clone` creates a directory and its first record under it, so a
        // directory seen without a record then is debris, not a clone being set up.
        let listing = (try? await store.withLock { store.listClones() }) ?? TemplateStore.CloneListing()
        report.problems += listing.problems
        for id in listing.broken where await stopQEMU(named: id, into: &report) {
            await removeDirectory(of: id, into: &report)
        }
    }

    /// Stops every QEMU running as clone `id` (found by its `-name`). Returns false when one
    /// could not be stopped, so its directory stays.
    private func stopQEMU(named id: String, into report: inout GarbageReport) async -> Bool {
        let paths = store.clonePaths(id)
        var stoppedAll = true
        var owners: Set<uid_t> = [store.ownerUID]
        if let user = getpwnam(QEMUConfinement.systemUser) { owners.insert(user.pointee.pw_uid) }
        for instance in QEMUInstance.running(named: CloneRecord.qemuName(id: id), ownedBy: owners, qmpSocket: paths.qmpSocket, logPath: paths.qemuLog) {
            do {
                try await instance.stop(grace: .milliseconds(500), politely: false)
                report.stoppedQEMU.append(instance.pid)
            } catch {
                report.problems.append("clone \(id): \(VMTemplateError.oneLine(error))")
                stoppedAll = false
            }
        }
        return stoppedAll
    }

    private func removeDirectory(of id: String, into report: inout GarbageReport) async {
        do {
            try await store.withLock { try store.removeCloneDirectory(id, record: nil) }
            report.removedClones.append(id)
        } catch {
            report.problems.append("\(store.cloneDirectory(id)): \(VMTemplateError.oneLine(error))")
        }
    }
}

extension CloneEngine {
    /// Removes template `name`. Refused while clones of this store run from it, unless `force`,
    /// which stops them first (as `rm` does). Returns the clones it removed.
    public func removeTemplate(_ name: EntityName, force: Bool, grace: Duration = .seconds(3)) async throws -> [CloneRecord] {
        guard store.templateExists(name) else {
            throw VMTemplateError(.notFound, "no template named '\(name)': see 'vmtemplate list'.")
        }
        // Its warm pool goes first: members are no one's clones yet. Once the pool's size is 0
        // no filler lists another member (it checks under the store lock); one listed between the
        // drain and that moment is still recorded pooled, and goes too.
        let pool = WarmPool(engine: self)
        await pool.drain(name)
        try store.removePool(name)
        await pool.removeStrays(of: name)
        let users = store.clones().records.filter { $0.template == name.value && $0.templateStore == nil && $0.isLive && $0.state != .pooled && $0.state != .warming }
        if !users.isEmpty && !force {
            throw VMTemplateError(.busy, "template '\(name)' is used by \(users.count) running clone\(users.count == 1 ? "" : "s") (\(users.map(\.name).joined(separator: ", "))): remove them first (vmtemplate rm), or pass --force to stop them.")
        }
        for record in users {
            do {
                try await remove(record, grace: grace)
            } catch let error as VMTemplateError where error.code == .notFound {
                // Removed meanwhile by somebody else: gone either way.
            }
        }
        try await store.removeTemplateFiles(name)
        return users
    }
}
