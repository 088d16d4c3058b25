import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore
import Foundation


/// Samples every clone's copy-on-write memory and acts on clones over their limit.
///
/// It keeps no state of its own: limits, actions and what it did live in the clone records, so a
/// scheduler that is killed and started again carries on where it stopped, and `list`/`inspect`
/// show its actions. One scheduler per store runs at a time (`ROOT/scheduler.lock`).
public struct Scheduler: Sendable {
    public let store: TemplateStore
    /// How the scheduler reaches a clone's QEMU (verified before it is paused or killed).
    private let lifecycle: CloneLifecycle

    public init(store: TemplateStore) {
        self.store = store
        self.lifecycle = CloneLifecycle(store: store)
    }

    /// One pass over all clones. Returns the actions taken (each also saved in its record).
    /// A settings file that cannot be read is an error, never a fall-back to no limits.
    public func sampleOnce() async throws -> [Enforcement] {
        let records = store.clones().records
        let settings = try store.settings()
        return await withTaskGroup(of: Enforcement?.self) { group in
            for record in records {
                group.addTask { await check(record, settings: settings) }
            }
            var actions: [Enforcement] = []
            for await action in group { if let action { actions.append(action) } }
            return actions.sorted { $0.time < $1.time }
        }
    }

    private func check(_ record: CloneRecord, settings: StoreSettings) async -> Enforcement? {
        guard let qemu = record.qemu, !record.isBeingSetUp, record.state != .exited, record.state != .pooled else { return nil }
        guard qemu.isAlive else {
            // Marked here so `list` and `inspect` tell the story even before `gc` runs.
            await lifecycle.markExited(record)
            return nil
        }
        guard let limit = record.cowLimitBytes, record.state != .paused else { return nil }
        let cowBytes: UInt64
        do {
            cowBytes = try CloneMemoryUsage.measure(pid: qemu.pid, templateFile: record.memoryFile).copyOnWriteBytes
        } catch let error as VMTemplateError where error.code == .limitExceeded {
            // Memory too fragmented to be measured is no QEMU's doing: acted on as over the limit,
            // never skipped (a limit must not fail open).
            cowBytes = .max
        } catch {
            return nil
        }
        guard cowBytes > limit else { return nil }

        let (action, escalated, failedPauses) = Self.decide(configured: record.overLimitAction ?? settings.overLimitAction, previous: record.lastEnforcement, pauseAttempts: settings.pauseAttempts)
        var failure: String?
        switch lifecycle.qemu(of: record) {
        case .running(let instance):
            do {
                switch action {
                case .pause:
                    let qmp = try await instance.connectQMP(timeout: .seconds(2), phase: "pause")
                    defer { qmp.close() }
                    try await qmp.stop()
                case .kill where escalated:
                    try await instance.stop(grace: .seconds(1), politely: false)
                case .kill:
                    try instance.kill()
                }
            } catch {
                failure = "\(VMTemplateError.oneLine(error))"
            }
        case .exited:
            return nil
        case .notThisQEMU(let reason):
            failure = "not acted on: \(reason)"
        }
        let enforcement = Enforcement(time: Date(), clone: record.id, name: record.name, cowBytes: cowBytes, limitBytes: limit, action: action, done: failure == nil, error: failure,
                                      attempt: action == .pause ? failedPauses + 1 : nil, escalated: escalated ? true : nil)
        let paused = failure == nil && action == .pause
        let updated = try? await store.updateClone(record.id, reporting: { updated in
            guard paused, let updated else { return nil }
            var event = StoreEvent(.clonePaused, of: updated, reason: PausedBy.scheduler.rawValue)
            event.cowBytes = cowBytes
            event.limitBytes = limit
            return event
        }) { updated in
            updated.lastEnforcement = enforcement
            if paused {
                updated.state = .paused
                updated.pausedBy = .scheduler
            }
        }
        if failure == nil, action == .kill, let updated {
            await lifecycle.markExited(updated, reason: "killed over its copy-on-write limit")
        }
        return enforcement
    }

    /// What to do about a clone over its limit, given what was done last round: the configured
    /// action, except that a pause that failed `pauseAttempts` rounds in a row escalates to the
    /// stop ladder (a guest that cannot be paused keeps dirtying memory), and an escalated stop
    /// that failed is tried again as one, not after as many pauses again. `failedPauses`: the
    /// pauses that failed in a row before this round.
    static func decide(configured: OverLimitAction, previous: Enforcement?, pauseAttempts: Int) -> (action: OverLimitAction, escalated: Bool, failedPauses: Int) {
        let failedPauses = previous?.action == .pause && previous?.done == false ? min(previous?.attempt ?? 1, 1000) : 0
        let escalated = configured == .pause && (failedPauses >= pauseAttempts || (previous?.escalated == true && previous?.done == false))
        return (escalated ? .kill : configured, escalated, failedPauses)
    }

    /// Takes `scheduler.lock`, or refuses naming the scheduler that holds it: two schedulers on
    /// one store would act on a clone twice and count every action double.
    private func exclusively() throws -> FileLock {
        let lock = try store.openLockFile("\(store.root)/scheduler.lock")
        guard lock.tryExclusive() else {
            let holder = lock.holders().first.map { " (process \($0.pid), \(TerminalText.escape($0.command)))" } ?? ""
            throw VMTemplateError(.busy, "another scheduler\(holder) is already running on store '\(store.root)': run only one per store (`scheduler --once` too).")
        }
        return lock
    }

    /// One pass (``sampleOnce()``) holding the scheduler lock: `scheduler --once`.
    public func runOnce() async throws -> [Enforcement] {
        let lock = try exclusively()
        defer { lock.unlock() }
        return try await sampleOnce()
    }

    /// Runs until cancelled: a pass every `interval` (nil: the store's setting, re-read each pass).
    /// `log` receives each action as one JSON line.
    public func run(interval: Double? = nil, log: @Sendable (String) -> Void, onEnforcement: @Sendable (Enforcement) -> Void = { _ in }) async throws {
        _ = try store.settings()
        // A `scheduler --once` holds the lock for one round: waited for, up to 5 s, rather than
        // taken for another long-running scheduler.
        var acquired: FileLock?
        for attempt in 0..<50 {
            do {
                acquired = try exclusively()
                break
            } catch let error as VMTemplateError where error.code == .busy && attempt < 49 {
                try await Task.sleep(for: .milliseconds(100))
            }
        }
        guard let lock = acquired else { throw VMTemplateError(.internalError, "the scheduler lock was neither taken nor refused.") }
        defer { lock.unlock() }
        // A round that fails (a settings file broken meanwhile) is logged once and tried again:
        // a scheduler that stopped quietly would leave every limit unenforced.
        var lastFailure: String?
        while !Task.isCancelled {
            let started = ContinuousClock.now
            var seconds = interval ?? StoreSettings().intervalSeconds
            do {
                for action in try await sampleOnce() {
                    onEnforcement(action)
                    if let line = try? JSONCoding.line(action) { log(line) }
                }
                seconds = try interval ?? store.settings().intervalSeconds
                lastFailure = nil
            } catch {
                let failure = VMTemplateError.oneLine(error)
                if failure != lastFailure { log("scheduler: \(failure) Limits are not enforced until this is fixed.") }
                lastFailure = failure
            }
            let next = started + .seconds(fractional: seconds)
            if next > .now { try? await Task.sleep(until: next, clock: .continuous) }
        }
    }
}
