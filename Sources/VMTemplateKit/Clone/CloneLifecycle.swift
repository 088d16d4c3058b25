import Foundation
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

/// A clone's life after `clone`: its QEMU, its state, pause and resume, removal.
public struct CloneLifecycle: Sendable {
    /// The store the clones are in.
    public let store: TemplateStore

    public init(store: TemplateStore) {
        self.store = store
    }

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
    public func remove(_ record: CloneRecord, grace: Duration = .seconds(3), reason: String = "removed") async throws -> QEMUInstance.StopResult {
        try await store.withLock { try $0.claimRemoval(of: record.id) }
        do {
            return try await stopAndRemove(record, grace: grace, reason: reason)
        } catch {
            // Not removed: the next caller may try again.
            store.releaseRemoval(of: record.id)
            throw error
        }
    }

    private func stopAndRemove(_ record: CloneRecord, grace: Duration, reason: String) async throws -> QEMUInstance.StopResult {
        var how = QEMUInstance.StopResult.alreadyExited
        switch qemu(of: record) {
        case .running(let instance):
            how = try await instance.stop(grace: grace)
        case .exited:
            break
        case .notThisQEMU(let reason):
            throw VMTemplateError(.invalidState, "clone \(record.id) names process \(record.qemu?.pid ?? 0), which is not its QEMU (\(reason)): nothing was stopped or removed; check the record by hand.")
        }
        try await store.withLock { locked in
            do {
                try locked.removeCloneDirectory(record.id, record: record, reason: reason)
            } catch let error as VMTemplateError {
                throw VMTemplateError(.ioError, "clone \(record.id) stopped but its directory could not be removed: \(error.message)", cause: error.cause)
            }
        }
        return how
    }

    /// Records, once, that clone `record`'s QEMU has ended: its record's state and `exit` (how:
    /// `waitStatus` when this process was its parent, the last lines of its log), and the journal's
    /// `clone.exited`. Returns the record as written (nil: gone, or it could not be written).
    @discardableResult
    public func markExited(_ record: CloneRecord, reason: String = "exited", waitStatus: Int32? = nil) async -> CloneRecord? {
        let words = TerminalText.escape(LogTail.lastLines(ofFile: store.clonePaths(record.id).qemuLog, count: 3, maxBytes: 4096))
        var exit = CloneExit(reason: reason, lastWords: words.isEmpty ? nil : TerminalText.prefix(words, bytes: 600))
        if let waitStatus {
            if waitStatus & 0x7f == 0 { exit.exitStatus = (waitStatus >> 8) & 0xff } else { exit.signal = waitStatus & 0x7f }
        }
        let noticed = exit
        var first = false
        return try? await store.updateClone(record.id, reporting: { updated in
            guard first, let updated else { return nil }
            var event = StoreEvent(.cloneExited, of: updated, reason: reason)
            event.exitStatus = noticed.exitStatus
            event.signal = noticed.signal
            event.lastWords = noticed.lastWords
            return event
        }) { updated in
            guard updated.exit == nil else { return }
            first = true
            updated.state = .exited
            updated.pausedBy = nil
            updated.exit = noticed
        }
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
            try await store.withLock { try $0.recommit(record.id, committedBytes: max(committed, record.committedBytes)) }
        }
        let qmp = try await qemu.connectQMP(timeout: .seconds(5), phase: "resume")
        defer { qmp.close() }
        try await qmp.cont()
        return try await store.updateClone(record.id, reporting: { StoreEvent(.cloneResumed, of: $0 ?? record) }) { updated in
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
        return try await store.updateClone(record.id, reporting: { StoreEvent(.clonePaused, of: $0 ?? record, reason: PausedBy.user.rawValue) }) { updated in
            updated.state = .paused
            updated.pausedBy = .user
        } ?? record
    }

    /// Refuses a clone whose guest cannot answer a request now: a pool member not handed out, a
    /// paused or exited clone, another user's. Said at once instead of waiting out a timeout.
    public func refuseUnlessAnswering(_ record: CloneRecord) async throws {
        if let refusal = Self.refusalBeforeHandOut(record) { throw refusal }
        switch await liveState(of: record) {
        case .paused:
            throw VMTemplateError(.invalidState, "clone \(record.id) (\(record.name)) is paused\(record.lastEnforcement.map { " by the scheduler (copy-on-write \(ByteSize(bytes: $0.cowBytes)) over its limit)" } ?? ""): resume it first (vmtemplate resume \(record.id)).")
        case .exited:
            throw VMTemplateError(.invalidState, "clone \(record.id) (\(record.name)) has exited: remove it (vmtemplate rm \(record.id)) and clone again.")
        case .notYours:
            throw VMTemplateError(.permissionDenied, "clone \(record.id) (\(record.name)) is not yours: only its owner (or root) may talk to it.")
        default:
            break
        }
    }

    /// Runs `command` in the clone's guest through its guest agent and waits for it. The agent
    /// serves one client at a time: this waits behind the clone's own setup steps and any other
    /// client, within `timeout`.
    public func exec(_ command: [String], in record: CloneRecord, timeout: Duration) async throws -> GuestAgentConnection.ExecResult {
        try GuestCommand.check([command], key: "the command")
        if let refusal = Self.refusalBeforeHandOut(record) { throw refusal }
        guard record.guestAgent == true else {
            // The clone's state (its machine has no agent port), not a missing feature: 409, not 501.
            throw VMTemplateError(.invalidState, "clone \(record.id) (\(record.name)) has no guest agent port: its template was made without \"ready_when\" or \"guest_setup\" set to \"guest-agent\" (docs/guests.md).")
        }
        try await refuseUnlessAnswering(record)
        let socket = store.cloneLayout(record.id).instance.agentSocket
        let root = store.root
        let deadline = ContinuousClock.now + timeout
        return try await onOwnThread {
            // The store may be another user's: no link below it is followed to another socket.
            let agent = try GuestAgentConnection.connect(path: socket, storeRoot: root, timeout: timeout)
            defer { agent.close() }
            try agent.synchronize(until: deadline)
            return try agent.run(command, until: deadline)
        }
    }
}
