import CLinuxHost
import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Reaps the children this process has let go of.
///
/// `clone` starts QEMU as its own child and keeps a ``ProcessHandle`` only while it sets the clone
/// up; later, `rm` or the scheduler stop that QEMU through a handle on its identity, which cannot
/// `waitpid`. A short-lived CLI exits and init reaps what it started; a long-lived process
/// (`serve`) would keep every clone it ever made as a zombie, holding a PID and a slot of the QEMU
/// user's process count, until it exits. Once ``enable()`` was called, a handle on a child that is
/// dropped before its child exited hands the child here, and one thread reaps each child the moment
/// its pidfd says it exited (no polling: an idle server stays idle).
package enum ChildReaper {
    private struct Child: Equatable {
        var pid: Int32
        /// -1 where the kernel has no pidfd: such children are looked at once a second.
        var pidfd: Int32
    }

    private struct State {
        var enabled = false
        var children: [Child] = []
        /// The write end of a pipe that wakes the thread when a child is added.
        var wake: Int32 = -1
        /// How the last children reaped ended (wait statuses), oldest first: what `serve` tells
        /// of a clone whose QEMU exited. Bounded: a status nobody asked for is forgotten.
        var reaped: [(pid: Int32, status: Int32)] = []
    }

    /// The most statuses kept.
    static let maxReaped = 1024

    private static let state = Mutex(State())

    /// From now on, children let go of are reaped as they exit. Idempotent; for long-lived
    /// processes only (a CLI that exits at once needs nothing reaped).
    package static func enable() {
        let start: Int32? = state.withLock { state -> Int32? in
            guard !state.enabled else { return nil }
            var ends: [Int32] = [-1, -1]
            guard pipe(&ends) == 0 else { return nil }
            for end in ends {
                _ = fcntl(end, F_SETFD, FD_CLOEXEC)
                _ = fcntl(end, F_SETFL, fcntl(end, F_GETFL) | O_NONBLOCK)
            }
            state.enabled = true
            state.wake = ends[1]
            return ends[0]
        }
        guard let wake = start else { return }
        let thread = Thread { run(woken: wake) }
        thread.stackSize = 1 << 18
        thread.start()
    }

    /// Takes over the reaping of child `pid` (and the ownership of `pidfd`). Returns false when
    /// reaping is not enabled: the caller keeps (and closes) the descriptor.
    static func adopt(pid: Int32, pidfd: Int32) -> Bool {
        let wake: Int32? = state.withLock { state -> Int32? in
            guard state.enabled else { return nil }
            // A status kept for an earlier child of this PID is not this one's.
            state.reaped.removeAll { $0.pid == pid }
            state.children.append(Child(pid: pid, pidfd: pidfd))
            return state.wake
        }
        guard let wake else { return false }
        var byte: UInt8 = 1
        _ = write(wake, &byte, 1)
        return true
    }

    /// How many children wait to be reaped (exited or not).
    package static var adoptedCount: Int { state.withLock { $0.children.count } }

    /// What became of child `pid`: `.pending` while it is adopted and not reaped yet, its wait
    /// status once reaped (taken: asked once), `.unknown` when it is no child handed here.
    package enum Outcome: Sendable, Equatable {
        case pending
        case reaped(Int32)
        case unknown
    }

    package static func outcome(of pid: Int32) -> Outcome {
        state.withLock { state in
            if state.children.contains(where: { $0.pid == pid }) { return .pending }
            if let index = state.reaped.lastIndex(where: { $0.pid == pid }) {
                return .reaped(state.reaped.remove(at: index).status)
            }
            return .unknown
        }
    }

    private static func run(woken wake: Int32) {
        while true {
            let children = state.withLock { $0.children }
            var descriptors = [pollfd(fd: wake, events: Int16(POLLIN), revents: 0)]
            descriptors += children.map { pollfd(fd: $0.pidfd, events: Int16(POLLIN), revents: 0) }
            // A child without a pidfd cannot wake the thread: look at it once a second.
            let timeout: Int32 = children.contains { $0.pidfd < 0 } ? 1000 : -1
            let ready = poll(&descriptors, nfds_t(descriptors.count), timeout)
            if ready < 0 && errno != EINTR { usleep(100_000) }
            if descriptors[0].revents != 0 {
                var drained = [UInt8](repeating: 0, count: 256)
                while read(wake, &drained, drained.count) > 0 {}
            }
            var reaped: [Child] = []
            var statuses: [(pid: Int32, status: Int32)] = []
            for child in children {
                var status: Int32 = 0
                let result = waitpid(child.pid, &status, WNOHANG)
                // ECHILD: somebody else reaped it (or it was never ours): nothing left to wait for.
                if result == child.pid || (result < 0 && errno == ECHILD) { reaped.append(child) }
                if result == child.pid { statuses.append((child.pid, status)) }
            }
            guard !reaped.isEmpty else { continue }
            // The very entries reaped, by PID and pidfd: once waitpid has freed a PID, a new child
            // adopted meanwhile may have it, and must keep its entry (its pidfd is another: the
            // reaped one stays open until here).
            state.withLock { state in
                for child in reaped where child.pidfd >= 0 { close(child.pidfd) }
                state.children.removeAll { reaped.contains($0) }
                state.reaped.append(contentsOf: statuses)
                if state.reaped.count > maxReaped { state.reaped.removeFirst(state.reaped.count - maxReaped) }
            }
        }
    }
}
