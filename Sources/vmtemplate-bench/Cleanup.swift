import Dispatch
import Foundation
import Synchronization
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Everything the bench started, so that nothing outlives it: not on success, not on an error,
/// not on Ctrl-C.
///
/// QEMU runs in a session of its own (`QEMUInstance.launch` and the CLI both use setsid), so a
/// Ctrl-C in the terminal never reaches it: it has to be killed. Three nets:
/// - QEMU processes the bench spawned itself, by their `QEMUInstance`;
/// - clones in the store whose record names one of the bench's CLI children, or the bench
///   itself, as creator (covers a `vmtemplate clone` interrupted before it printed its clone ID);
/// - any process whose command line mentions one of the bench's scratch directories (every path
///   those QEMUs get lives there), then the directories themselves.
final class Cleanup: Sendable {
    static let shared = Cleanup()

    private struct State {
        var qemus: [pid_t: QEMUInstance] = [:]
        var runningChildren: [pid_t: ChildProcess] = [:]
        var allChildren: Set<pid_t> = []
        var stores: [TemplateStore] = []
        var scratchDirectories: [String] = []
        /// Set by a signal: whatever is spawned from then on is killed at once.
        var interrupted = false
    }

    private let state = Mutex(State())
    /// Held for a whole sweep, so that the main flow's final sweep waits for the signal handler's
    /// (which runs on another thread) instead of exiting half-way through it.
    private let sweeping = Mutex(())

    var interrupted: Bool { state.withLock { $0.interrupted } }

    func adopt(qemu: QEMUInstance) {
        let interrupted = state.withLock { state -> Bool in
            state.qemus[qemu.pid] = qemu
            return state.interrupted
        }
        if interrupted { _ = try? qemu.kill() }
    }

    func release(qemu: QEMUInstance) { _ = state.withLock { $0.qemus.removeValue(forKey: qemu.pid) } }

    func adopt(child: ChildProcess) {
        let interrupted = state.withLock { state -> Bool in
            state.runningChildren[child.pid] = child
            state.allChildren.insert(child.pid)
            return state.interrupted
        }
        if interrupted { _ = try? child.handle.signal(SIGKILL) }
    }

    func release(child: ChildProcess) { _ = state.withLock { $0.runningChildren.removeValue(forKey: child.pid) } }

    /// A store whose clones made by the bench's CLI children must be stopped at the end.
    func watch(store: TemplateStore) { state.withLock { $0.stores.append(store) } }

    /// A directory removed at the end, after every process mentioning it was killed.
    func own(scratchDirectory: String) { state.withLock { $0.scratchDirectories.append(scratchDirectory) } }

    /// Kills everything still running and removes the scratch directories. Safe to call twice,
    /// and from two threads: the second call returns once the first is done.
    func sweep(interrupted: Bool = false) {
        if interrupted { state.withLock { $0.interrupted = true } }
        sweeping.withLock { _ in sweepLocked(interrupted: interrupted) }
    }

    private func sweepLocked(interrupted: Bool) {
        let snapshot = state.withLock { current -> State in
            let copy = current
            current = State(allChildren: current.allChildren, interrupted: current.interrupted || interrupted)
            return copy
        }
        for child in snapshot.runningChildren.values { _ = try? child.handle.signal(SIGKILL) }
        for child in snapshot.runningChildren.values { _ = child.handle.waitBlocking() }
        for qemu in snapshot.qemus.values { _ = try? qemu.kill() }
        for store in snapshot.stores {
            let lifecycle = CloneLifecycle(store: store)
            for record in store.clones().records {
                // Clones made by the CLI children, or by CloneEngine in this very process (profile).
                guard let creator = record.creator, snapshot.allChildren.contains(creator.pid) || creator.pid == getpid() else { continue }
                if case .running(let qemu) = lifecycle.qemu(of: record) { _ = try? qemu.kill() }
                try? FileSystem.removeTree(path: store.cloneDirectory(record.id))
            }
        }
        for directory in snapshot.scratchDirectories {
            for pid in Self.processes(mentioning: directory) {
                if let identity = ProcessIdentity.current(pid: pid), let process = ProcessHandle.open(identity) {
                    _ = try? process.signal(SIGKILL)
                }
            }
        }
        for qemu in snapshot.qemus.values { qemu.waitForExitBlocking() }
        for directory in snapshot.scratchDirectories {
            // Killed processes that are not our children (clones the CLI started) take a moment to
            // go; removing files under them works anyway on Linux, but wait so `ps` is clean after.
            for _ in 0..<200 where !Self.processes(mentioning: directory).isEmpty { usleep(10_000) }
            try? FileSystem.removeTree(path: directory)
        }
    }

    /// Processes (other than this one) whose command line contains `text`.
    static func processes(mentioning text: String) -> [pid_t] {
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc") else { return [] }
        let me = getpid()
        let needle = Array(text.utf8)
        return entries.compactMap { entry -> pid_t? in
            guard let pid = pid_t(entry), pid != me,
                  let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline"), !data.isEmpty
            else { return nil }
            let bytes = [UInt8](data)
            guard bytes.count >= needle.count else { return nil }
            for start in 0...(bytes.count - needle.count) where bytes[start] == needle[0] {
                if Array(bytes[start..<(start + needle.count)]) == needle { return pid }
            }
            return nil
        }
    }

    /// Ctrl-C, SIGTERM and SIGHUP sweep and exit. Returns the sources, which must be kept alive.
    func installSignalHandlers() -> [any DispatchSourceSignal] {
        [SIGINT, SIGTERM, SIGHUP].map { signalNumber in
            signal(signalNumber, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: signalNumber, queue: .global())
            source.setEventHandler {
                FileHandle.standardError.write(Data("\nvmtemplate-bench: interrupted; stopping every QEMU it started\n".utf8))
                Cleanup.shared.sweep(interrupted: true)
                exit(128 + signalNumber)
            }
            source.resume()
            return source
        }
    }
}
