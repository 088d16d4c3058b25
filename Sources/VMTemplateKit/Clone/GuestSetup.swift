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
/// only after 100–200 ms. So `clone` connects to the channel and writes both lines before it
/// returns, and a detached helper inherits the connection and holds it until the guest has
/// answered both (at most `timeout`). QEMU serves one client at a time, so a runtime's first
/// connection, made after `clone` returned, waits in the socket's backlog and its first request is
/// answered after these, never before. Closing at once would not do: QEMU's socket chardev takes
/// only what the serial FIFO has room for (16 bytes), drops the rest when the connection hangs up,
/// and the guest's replies would go to the next client.
public struct GuestSetup: Sendable {
    public var controlSocket: String
    public var epoch: Int
    public var hostname: String

    public init(controlSocket: String, epoch: Int, hostname: String) {
        self.controlSocket = controlSocket
        self.epoch = epoch
        self.hostname = hostname
    }

    var lines: [String] { ["settime \(epoch)", "hostname \(hostname)"] }

    /// The descriptor the helper finds the connection at.
    public static let helperDescriptor: Int32 = 3

    /// How long the guest is given to answer. Generous on purpose: leaving early would leave the
    /// guest's replies for the next client. A guest that takes a minute is one no runtime can
    /// talk to either.
    public static let replyTimeout = Duration.seconds(60)

    /// Connects and writes both requests now; then either starts `helper` (an executable whose
    /// `_guest-setup --descriptor 3` subcommand runs ``awaitReplies(on:)``: the vmtemplate CLI)
    /// in a session of its own with the connection, or, without one, a thread of this process
    /// waits for the replies (for long-lived callers only: the thread dies with the process).
    /// Returns at once. The helper's complaints go to `logPath`.
    public func start(helper: String?, logPath: String) throws {
        let channel = ControlChannel(path: controlSocket)
        let fd = try channel.connect()
        do {
            try channel.send(lines, on: fd)
        } catch {
            close(fd)
            throw error
        }
        guard let helper else {
            let thread = Thread {
                _ = try? channel.replies(2, on: fd, timeout: Self.replyTimeout)
                close(fd)
            }
            thread.start()
            return
        }
        defer { close(fd) }
        var request = SpawnRequest(executable: helper, arguments: ["_guest-setup", "--socket", controlSocket, "--descriptor", String(Self.helperDescriptor)], stdoutPath: logPath)
        request.newSession = true
        request.inherited = [(fd, Self.helperDescriptor)]
        _ = try ProcessHandle.spawn(request)
    }

    /// In the helper: waits for the guest's two replies on the inherited connection.
    public static func awaitReplies(on fd: Int32, controlSocket: String) throws -> [String] {
        defer { close(fd) }
        return try ControlChannel(path: controlSocket).replies(2, on: fd, to: ["settime", "hostname"], timeout: replyTimeout)
    }
}
