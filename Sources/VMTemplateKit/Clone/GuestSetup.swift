import CLinuxHost
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
/// returns, and a forked child (or, in a long-lived process, a thread) holds the connection until
/// the guest has answered both (at most ``replyTimeout``). QEMU serves one client at a time, so a runtime's first
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

    /// How long the guest is given to answer. Generous on purpose: leaving early would leave the
    /// guest's replies for the next client. A guest that takes a minute is one no runtime can
    /// talk to either.
    public static let replyTimeout = Duration.seconds(60)

    /// Who waits for the guest's replies once the requests are written.
    public enum Waiter: Sendable {
        /// A forked child of this process (for a command that exits right after the clone): no
        /// program start-up, which on two cores would compete with the guest that just resumed.
        /// What goes wrong is written to `logPath`.
        case forkedChild(logPath: String)
        /// A thread of this process (for a long-lived one, such as `vmtemplate serve`).
        case thread
    }

    /// Connects and writes both requests now, and leaves the replies to `waiter`. Returns at once.
    public func start(waiter: Waiter) throws {
        let channel = ControlChannel(path: controlSocket)
        let fd = try channel.connect()
        do {
            try channel.send(lines, on: fd)
        } catch {
            close(fd)
            throw error
        }
        switch waiter {
        case .thread:
            let thread = Thread {
                _ = try? channel.replies(2, on: fd, timeout: Self.replyTimeout)
                close(fd)
            }
            thread.start()
        case .forkedChild(let logPath):
            defer { close(fd) }
            let log = open(logPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0o600)
            defer { if log >= 0 { close(log) } }
            let timeout = Int32(clamping: Self.replyTimeout.components.seconds * 1000)
            let pid = clinuxhost_fork_reply_waiter(fd, 2, timeout, log)
            guard pid > 0 else {
                throw VMTemplateError(.ioError, "cannot fork the process that waits for the guest's replies: \(errnoText(-pid)).", cause: SystemCallError("fork", code: -pid))
            }
        }
    }
}

extension GuestSetup {
    /// Tells a resumed clone's guest what its template's `guest_setup` says (the control channel's
    /// clock and hostname, or the guest agent's steps), without waiting for it: sets the record's
    /// `clock` and `guest_setup`.
    static func begin(_ record: inout CloneRecord, template: TemplateManifest, store: TemplateStore, request: CloneRequest) {
        let clock = template.guestClock ?? .none
        let layout = store.cloneLayout(record.id)
        guard clock == .guestAgent else {
            record.clock = start(clock, name: record.name, controlSocket: layout.instance.controlSocket, logPath: layout.guestSetupLog, inChild: request.guestRepliesInChild)
            return
        }
        let setup = GuestAgentSetup(cloneID: record.id, hostname: record.name, commands: template.guestCommands ?? [])
        let runner: GuestAgentSetup.Runner = request.guestSetupChannel.map { .helper(channel: $0) } ?? .task
        record.guestSetup = GuestAgentSetup.start(setup, store: store, runner: runner)
        record.clock = record.guestSetup == "running" ? "requested" : "not-sent"
    }

    /// Tells a resumed guest the time and its hostname the way its recipe says (`clock`), without
    /// waiting for it. Returns what the clone's record says of it: `none`, `requested` or
    /// `not-sent` (the reason then goes to `logPath`, where the reply waiter would have written).
    static func start(_ clock: GuestClock, name: String, controlSocket: String, logPath: String, inChild: Bool) -> String {
        guard clock == .controlChannel else { return "none" }
        let setup = GuestSetup(controlSocket: controlSocket, epoch: Int(Date().timeIntervalSince1970.rounded()), hostname: name)
        do {
            try setup.start(waiter: inChild ? .forkedChild(logPath: logPath) : .thread)
            return "requested"
        } catch {
            // The record keeps a fixed word (scripts compare it).
            try? FileSystem.writeFileAtomically(path: logPath, data: Array("not sent: \(error)\n".utf8), mode: 0o600, durable: false)
            return "not-sent"
        }
    }
}
