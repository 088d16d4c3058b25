import Foundation
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What a clone's guest is told when it starts: the time and its hostname, over its control
/// channel (`settime EPOCH`, `hostname NAME`).
///
/// Nothing on the clone path may wait for the guest: a resumed TCG guest answers its first request
/// only after 100–200 ms. Writing and closing at once does not work either: QEMU's socket chardev
/// takes only what the serial FIFO has room for (16 bytes) and drops the rest when the connection
/// hangs up. So a detached helper holds the channel until the guest has answered both lines (at
/// most `timeout`); meanwhile a runtime's first connection waits in the socket's backlog (QEMU
/// serves one client at a time), so its first request is answered after these, never before.
public struct GuestSetup: Sendable {
    public var controlSocket: String
    public var epoch: Int
    public var hostname: String

    public init(controlSocket: String, epoch: Int, hostname: String) {
        self.controlSocket = controlSocket
        self.epoch = epoch
        self.hostname = hostname
    }

    /// The arguments of the helper subcommand that delivers it (`vmtemplate _guest-setup ...`).
    public var helperArguments: [String] {
        ["_guest-setup", "--socket", controlSocket, "--epoch", String(epoch), "--hostname", hostname]
    }

    /// Sends both requests on one connection and waits for both replies (blocking).
    ///
    /// The wait is long on purpose: leaving before the guest has read both lines would leave the
    /// rest of them in QEMU's buffer, in front of the next client's first request. A guest that
    /// takes a minute to answer is one no runtime can talk to either.
    public func deliver(timeout: Duration = .seconds(60)) throws -> [String] {
        let channel = ControlChannel(path: controlSocket)
        return try channel.requests(["settime \(epoch)", "hostname \(hostname)"], timeout: timeout)
    }

    /// Starts the helper `executable` (which must run ``deliver(timeout:)`` for `_guest-setup`)
    /// in a session of its own and returns at once; it outlives this process. What it says on
    /// failure goes to `logPath`.
    public func launchHelper(executable: String, logPath: String) throws {
        var request = SpawnRequest(executable: executable, arguments: helperArguments, stdoutPath: logPath)
        request.newSession = true
        _ = try ProcessHandle.spawn(request)
    }
}
