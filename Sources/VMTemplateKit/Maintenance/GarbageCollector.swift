import Foundation
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// `vmtemplate gc`: removes what killed commands and exited clones left behind. Anything whose
/// creator still runs is left alone; a process is signalled only once it is known to be the
/// clone's own QEMU (or found by the clone's `-name` among the store owner's processes).
public struct GarbageCollector: Sendable {
    public let store: TemplateStore
    var lifecycle: CloneLifecycle { CloneLifecycle(store: store) }

    public init(store: TemplateStore) {
        self.store = store
    }

    /// `gc`: what interrupted `create`s left in staging (``TemplateStore/collectStagingGarbage(into:)``),
    /// the clones that are over (``collectCloneGarbage(into:)``), pool members no pool may hand
    /// out, stale index entries and a killed server's files.
    public func collect() async -> GarbageReport {
        var report = GarbageReport()
        await store.collectStagingGarbage(into: &report)
        store.collectPullGarbage(into: &report)
        await collectCloneGarbage(into: &report)
        let pool = WarmPool(launcher: CloneLauncher(store: store))
        report.removedClones += await pool.removeStrays()
        pool.repair()
        do {
            report.removedFiles += try await store.withLock { locked in
                _ = try locked.rebuildLiveIndex()
                return locked.pruneNameIndex()
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
            switch lifecycle.qemu(of: record) {
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
        let listing = (try? await store.withLock { _ in store.listClones() }) ?? TemplateStore.CloneListing()
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
            try await store.withLock { try $0.removeCloneDirectory(id, record: nil, reason: "gc") }
            report.removedClones.append(id)
        } catch {
            report.problems.append("\(store.cloneDirectory(id)): \(VMTemplateError.oneLine(error))")
        }
    }
}
