import Foundation
import Synchronization
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

/// `serve`'s watch on the clones' QEMUs: a clone whose QEMU ends by itself (its guest powered
/// off, QEMU crashed or was killed from outside) is recorded `exited` within ``interval``, with
/// how it ended, and the journal says `clone.exited`; exited clones are removed once they have
/// been exited for ``retention`` (`clone.removed`, reason `retention`). A running clone whose
/// devices its guest has not been seen to have is asked until it has them (``DeviceReadiness``,
/// `clone.devices-ready`).
///
/// Each live clone's QEMU is held by a pidfd, polled without waiting: an idle store costs a
/// `poll(2)` and a `stat(2)` of the journal per round. The list of clones is read again only when
/// the journal has moved (every new clone is in it) or every few seconds.
public struct CloneWatcher: Sendable {
    public let store: TemplateStore
    /// How long an exited clone is kept (nil: until somebody removes it).
    public var retention: Duration?
    public var interval: Duration = .milliseconds(250)

    /// The default ``retention``: long enough for a runtime to read the exit (the event, or
    /// `GET /v1/clones/{id}`), short enough that exits do not pile up.
    public static let defaultRetention = Duration.seconds(60)

    public init(store: TemplateStore, retention: Duration? = CloneWatcher.defaultRetention) {
        self.store = store
        self.retention = retention
    }

    /// How long the guest is given to show its devices before the watcher gives up on them (until
    /// they change).
    public static let deviceTimeout = Duration.seconds(30)

    /// Watches until cancelled. `log` takes one line at a time.
    public func run(log: @escaping @Sendable (String) -> Void) async {
        let lifecycle = CloneLifecycle(store: store)
        let readiness = DeviceReadiness(store: store)
        /// Clone ID and device IDs of each device check running or given up.
        let probes = Mutex<Set<String>>([])
        var watched: [String: (record: CloneRecord, qemu: ProcessHandle)] = [:]
        /// Rounds a dead child's status has been waited for, by clone.
        var waitedFor: [String: Int] = [:]
        var journalSeen: UInt64?
        var lastScan = ContinuousClock.now - .seconds(60)
        while !Task.isCancelled {
            let journal = store.events.lastSeq()
            if journal != journalSeen || lastScan.duration(to: .now) > .seconds(5) {
                journalSeen = journal
                lastScan = .now
                var live: [String: (record: CloneRecord, qemu: ProcessHandle)] = [:]
                let records = store.clones().records
                for record in records {
                    if record.exit != nil {
                        await removeIfExpired(record, lifecycle: lifecycle, log: log)
                        continue
                    }
                    // Pool members are the pool's: one that dies is replaced, never handed out.
                    guard let identity = record.qemu, record.state != .pooled, record.state != .warming else { continue }
                    if record.devicesReady == false, record.state == .running {
                        let key = ([record.id] + (record.devices ?? []).map(\.id)).joined(separator: " ")
                        if probes.withLock({ $0.insert(key).inserted }) {
                            Task {
                                do {
                                    try await readiness.wait(for: record, timeout: Self.deviceTimeout)
                                    // Done: the key stays, so the same devices are not asked again.
                                } catch {
                                    log("clone \(record.id): devices not seen: \(VMTemplateError.oneLine(error))")
                                }
                            }
                        }
                    }
                    if let held = watched[record.id], held.qemu.identity == identity {
                        live[record.id] = (record, held.qemu)
                    } else if let handle = ProcessHandle.open(identity) {
                        live[record.id] = (record, handle)
                    } else if identity.isKnownGone, !record.isBeingSetUp || record.creator?.isAlive != true {
                        // Ended while nobody watched (no server ran): noticed now.
                        await lifecycle.markExited(record)
                    }
                }
                watched = live
                // Checks of clones that are gone are forgotten: the set stays as big as the store.
                let ids = Set(records.map(\.id))
                probes.withLock { $0 = $0.filter { ids.contains(String($0.prefix { $0 != " " })) } }
            }
            // An exit is what the pidfd says, confirmed by /proc: a failed read is no exit.
            for (id, held) in watched where !held.qemu.isRunning && held.qemu.identity.isKnownGone {
                // Its parent (this process, for clones made through the API or its pools) reaps
                // it on a thread of its own: a few rounds for its status, then without it.
                var status: Int32?
                switch ChildReaper.outcome(of: held.qemu.pid) {
                case .pending where waitedFor[id, default: 0] < 8:
                    waitedFor[id, default: 0] += 1
                    continue
                case .reaped(let reaped):
                    status = reaped
                default:
                    break
                }
                waitedFor[id] = nil
                watched[id] = nil
                // The clone being set up is its `clone`'s to clean up if it fails.
                guard let current = store.cloneRecord(id), !current.isBeingSetUp || current.creator?.isAlive != true else { continue }
                if let exited = await lifecycle.markExited(current, waitStatus: status), let exit = exited.exit {
                    log("clone \(id) (\(exited.name)) exited: \(exit.exitStatus.map { "status \($0)" } ?? exit.signal.map { "signal \($0)" } ?? exit.reason)")
                }
            }
            try? await Task.sleep(for: interval)
        }
    }

    private func removeIfExpired(_ record: CloneRecord, lifecycle: CloneLifecycle, log: (String) -> Void) async {
        guard let retention, let exit = record.exit, Date().timeIntervalSince(exit.time) >= retention.seconds else { return }
        // Its QEMU must be gone: a record that says exited of a running QEMU is not acted on.
        guard case .exited = lifecycle.qemu(of: record), record.qemu?.isKnownGone ?? true else { return }
        do {
            try await lifecycle.remove(record, grace: .milliseconds(200), reason: "retention")
        } catch let error as VMTemplateError where error.code == .notFound {
            // Removed meanwhile by somebody else.
        } catch {
            log("clone \(record.id): not removed after its retention: \(VMTemplateError.oneLine(error))")
        }
    }
}
