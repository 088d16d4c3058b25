import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension CloneEngine {
    /// The clone's state right now: `exited` when its QEMU is gone (PID and start time must both
    /// match), else what QMP says, or `unresponsive` when QMP does not answer within `timeout`.
    public func liveState(of record: CloneRecord, timeout: Duration = .milliseconds(500)) async -> CloneState {
        guard let qemu = record.qemu else {
            return record.creator?.isAlive == true ? .starting : .exited
        }
        guard qemu.isAlive else { return .exited }
        if record.state == .starting { return record.creator?.isAlive == true ? .starting : .unresponsive }
        do {
            let qmp = try await QMPClient.connect(socketPath: record.paths.qmpSocket, timeout: timeout, isPeerAlive: { qemu.isAlive })
            defer { qmp.close() }
            let status = try await qmp.queryStatus()
            return status.running ? .running : .paused
        } catch {
            return qemu.isAlive ? .unresponsive : .exited
        }
    }

    /// Stops a clone's QEMU with a ladder (QMP `quit`, SIGTERM, SIGKILL after `grace` each) and
    /// removes its directory and record. Returns how it was stopped.
    @discardableResult
    public func remove(_ record: CloneRecord, grace: Duration = .seconds(3)) async throws -> String {
        var how = "already exited"
        if let qemu = record.qemu, qemu.isAlive {
            how = "quit"
            if let qmp = try? await QMPClient.connect(socketPath: record.paths.qmpSocket, timeout: .seconds(1), isPeerAlive: { qemu.isAlive }) {
                try? await qmp.quit()
                qmp.close()
            }
            if !(await Self.waitForExit(qemu, timeout: grace)) {
                how = "SIGTERM"
                kill(qemu.pid, SIGTERM)
                if !(await Self.waitForExit(qemu, timeout: grace)) {
                    how = "SIGKILL"
                    kill(qemu.pid, SIGKILL)
                    _ = await Self.waitForExit(qemu, timeout: .seconds(10))
                }
            }
            if qemu.isAlive {
                throw VMTemplateError(.qemuFailed, "clone \(record.id) (QEMU pid \(qemu.pid)) did not stop even after SIGKILL: check the process by hand.")
            }
        }
        try store.withLock {
            do {
                try FileSystem.removeTree(path: store.cloneDirectory(record.id))
            } catch let error as VMTemplateError {
                throw VMTemplateError(.ioError, "clone \(record.id) stopped but its directory could not be removed: \(error.message)")
            }
        }
        return how
    }

    static func waitForExit(_ qemu: ProcessIdentity, timeout: Duration) async -> Bool {
        let deadline = ContinuousClock.now + timeout
        while qemu.isAlive {
            if ContinuousClock.now >= deadline { return false }
            try? await Task.sleep(for: .milliseconds(5))
        }
        return true
    }
}
