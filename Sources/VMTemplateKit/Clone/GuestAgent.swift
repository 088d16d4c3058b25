import VMTemplateOS
import VMTemplateQEMU
import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A connection to a guest's `qemu-guest-agent`, over the virtio-serial port QEMU serves as a
/// Unix socket (``InstancePaths/agentSocket``). Blocking: run it on a thread of its own
/// (``onOwnThread(_:)``).
///
/// The channel is a byte stream that outlives its clients: a request a previous client sent may
/// still be answered after it left, and the agent's parser may hold half a request. So every
/// conversation starts with `guest-sync-delimited` (docs/interop/qemu-ga.rst): a 0xFF byte resets
/// the agent's parser, and its reply, itself preceded by 0xFF, carries a fresh random ID; anything
/// before it is someone else's. Every reply is hostile input: a line is at most
/// ``maxReplyBytes``, every wait has a deadline, and nothing a guest says is printed unescaped.
public final class GuestAgentConnection {
    public let path: String
    private let fd: Int32
    /// The connection's socket (owned by this object until ``close()``).
    public var descriptor: Int32 { fd }
    /// Bytes received and not yet consumed: `buffer[consumed...]`. Consumed bytes are dropped only
    /// now and then, so a guest sending many short lines costs linear time, not quadratic.
    private var buffer: [UInt8] = []
    private var consumed = 0
    private var receiveBuffer = [UInt8](repeating: 0, count: 64 * 1024)

    /// The longest reply accepted: `guest-exec-status` carries a command's output in base64.
    public static let maxReplyBytes = 4 << 20
    /// The most output of one command kept (the rest is cut).
    public static let maxOutputBytes = 64 * 1024

    /// Takes over `fd`, a connected socket (closed by ``close()``).
    public init(fd: Int32, path: String) {
        self.fd = fd
        self.path = path
    }

    /// Connects to the agent's socket (close-on-exec). QEMU serves one client at a time: a second
    /// connection waits in the backlog until this one closes.
    public static func connect(path: String, storeRoot: String? = nil, timeout: Duration = .seconds(5)) throws -> GuestAgentConnection {
        let deadline = ContinuousClock.now + timeout
        guard let connected = UnixSocketAddress.connectStream(path: path, storeRoot: storeRoot, until: deadline) else {
            throw VMTemplateError(.invalidArgument, "guest agent socket path '\(TerminalText.escape(path))' is empty or too long for a Unix socket.")
        }
        switch connected {
        case .success(let fd):
            return GuestAgentConnection(fd: fd, path: path)
        case .failure(let error) where error.code == ENOENT:
            throw VMTemplateError(.unsupported, "there is no guest agent socket '\(TerminalText.escape(path))': the template was made without \"ready_when\": \"guest-agent\" or \"guest_setup\": \"guest-agent\" (docs/guests.md).", cause: error)
        case .failure(let error):
            throw VMTemplateError(.ioError, "cannot connect to the guest agent '\(TerminalText.escape(path))': \(errnoText(error.code)). Is the clone running (vmtemplate list)?", cause: error)
        }
    }

    public func close() {
        Glibc.close(fd)
    }

    // MARK: Synchronizing

    /// Waits until the agent answers a `guest-sync-delimited` of this connection's: the guest's
    /// agent runs and everything before is skipped. Asks again every `retryEvery` (a guest still
    /// booting has no agent yet: what was sent waits in the channel and is answered in order,
    /// earlier IDs first). `isAlive` is asked between tries.
    public func synchronize(until deadline: ContinuousClock.Instant, retryEvery: Duration = .seconds(2), isAlive: () -> Bool = { true }) throws {
        while true {
            let id = Int.random(in: 1...Int(Int32.max))
            var bytes: [UInt8] = [0xff]
            bytes += Array(#"{"execute":"guest-sync-delimited","arguments":{"id":\#(id)}}"#.utf8) + [0x0a]
            try write(bytes, until: deadline)
            let tryUntil = min(deadline, ContinuousClock.now + retryEvery)
            if try awaitSyncReply(id: id, until: tryUntil) { return }
            guard ContinuousClock.now < deadline else {
                throw VMTemplateError(.timeout, "the guest agent on '\(TerminalText.escape(path))' did not answer guest-sync-delimited in time.")
            }
            guard isAlive() else {
                throw VMTemplateError(.qemuFailed, "QEMU stopped while waiting for the guest agent.")
            }
        }
    }

    /// Skips to a 0xFF, then reads reply lines until `{"return": id}`; false when the time is up.
    private func awaitSyncReply(id: Int, until deadline: ContinuousClock.Instant) throws -> Bool {
        while true {
            guard let marker = buffer[consumed...].firstIndex(of: 0xff) else {
                buffer.removeAll(keepingCapacity: true)
                consumed = 0
                guard try fill(until: deadline) else { return false }
                continue
            }
            consumed = marker + 1
            // Replies of earlier syncs (and of anything before them) are skipped the same way.
            guard let line = try readLine(until: deadline) else { return false }
            if let reply = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: Any],
               let value = reply["return"] as? Int, value == id {
                return true
            }
        }
    }

    // MARK: Commands

    /// Sends one command and returns its `return` value; an `error` reply is thrown, in words.
    @discardableResult
    public func execute(_ command: String, arguments: [String: Any]? = nil, until deadline: ContinuousClock.Instant) throws -> Any {
        var request: [String: Any] = ["execute": command]
        if let arguments { request["arguments"] = arguments }
        let data = try JSONSerialization.data(withJSONObject: request, options: [.sortedKeys])
        try write(Array(data) + [0x0a], until: deadline)
        while true {
            guard let line = try readLine(until: deadline) else {
                throw VMTemplateError(.timeout, "the guest agent did not answer \(command) in time.")
            }
            // A stray 0xFF (a late sync reply's delimiter) is no reply.
            let text = line.filter { $0 != 0xff }
            if text.allSatisfy({ $0 == 0x20 || $0 == 0x0d || $0 == 0x09 }) { continue }
            guard let reply = try? JSONSerialization.jsonObject(with: Data(text)) as? [String: Any] else {
                throw VMTemplateError(.invalidState, "the guest agent answered \(command) with something that is not a JSON object: '\(TerminalText.escape(String(decoding: text.prefix(80), as: UTF8.self)))'.")
            }
            if let error = reply["error"] as? [String: Any] {
                let description = (error["desc"] as? String) ?? (error["class"] as? String) ?? "no reason given"
                throw VMTemplateError(.qemuFailed, "the guest agent refused \(command): \(TerminalText.escape(String(description.prefix(300)))).")
            }
            guard let value = reply["return"] else {
                // An event or an answer to someone else's request: not ours.
                continue
            }
            return value
        }
    }

    /// What a command run by `guest-exec` did.
    public struct ExecResult: Sendable {
        public var exitCode: Int?
        public var signal: Int?
        public var output: String
        public var errorOutput: String
        public var succeeded: Bool { exitCode == 0 && signal == nil }
        /// How it ended, in words: `exited N` or `killed by signal N`.
        public var ending: String { signal.map { "killed by signal \($0)" } ?? "exited \(exitCode ?? -1)" }
        /// Its last three lines of output (stdout, then stderr), escaped, at most 300 characters:
        /// what an error names of a command that failed.
        public var lastWords: String {
            let said = (output + errorOutput).split(whereSeparator: \.isNewline).suffix(3).joined(separator: " | ")
            return TerminalText.escape(String(said.prefix(300)))
        }
    }

    /// Runs `arguments` (the first is the program, looked up in the guest's PATH) through
    /// `guest-exec` and waits for it to exit (`guest-exec-status`, every 50 ms).
    /// `shown` is how errors name the command (a command with secrets in it is named as written,
    /// before its placeholders were filled in).
    public func run(_ arguments: [String], shown: [String]? = nil, until deadline: ContinuousClock.Instant) throws -> ExecResult {
        guard let program = arguments.first else { throw VMTemplateError(.invalidArgument, "an empty command cannot be run in the guest.") }
        let started = try execute("guest-exec", arguments: ["path": program, "arg": Array(arguments.dropFirst()), "capture-output": true], until: deadline)
        guard let pid = (started as? [String: Any])?["pid"] as? Int else {
            throw VMTemplateError(.invalidState, "the guest agent's answer to guest-exec names no process.")
        }
        while true {
            let status = try execute("guest-exec-status", arguments: ["pid": pid], until: deadline) as? [String: Any] ?? [:]
            if status["exited"] as? Bool == true {
                func text(_ key: String) -> String {
                    guard let encoded = status[key] as? String, let data = Data(base64Encoded: encoded) else { return "" }
                    return String(decoding: data.prefix(Self.maxOutputBytes), as: UTF8.self)
                }
                return ExecResult(exitCode: status["exitcode"] as? Int, signal: status["signal"] as? Int, output: text("out-data"), errorOutput: text("err-data"))
            }
            guard ContinuousClock.now < deadline else {
                throw VMTemplateError(.timeout, "'\(TerminalText.escape((shown ?? arguments).joined(separator: " ")))' did not finish in the guest in time.")
            }
            usleep(50_000)
        }
    }

    // MARK: Bytes

    /// Writes all of `bytes` by the deadline: a guest that stops reading its port makes QEMU stop
    /// draining the socket, and a blocking send would then wait forever.
    private func write(_ bytes: [UInt8], until deadline: ContinuousClock.Instant) throws {
        var offset = 0
        while offset < bytes.count {
            guard try wait(for: Int16(POLLOUT), until: deadline) else {
                throw VMTemplateError(.timeout, "the guest agent's channel '\(TerminalText.escape(path))' took nothing in time: the guest does not read its agent port.")
            }
            let written = bytes[offset...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
            if written < 0 && (errno == EINTR || errno == EAGAIN) { continue }
            guard written > 0 else {
                throw VMTemplateError(.ioError, "cannot send to the guest agent '\(TerminalText.escape(path))': \(errnoText()).", cause: SystemCallError("send"))
            }
            offset += written
        }
    }

    /// One line without its newline, or nil when the deadline passed first.
    private func readLine(until deadline: ContinuousClock.Instant) throws -> [UInt8]? {
        var searched = consumed
        while true {
            if let newline = buffer[searched...].firstIndex(of: 0x0a) {
                let line = Array(buffer[consumed..<newline])
                consumed = newline + 1
                if consumed > 64 * 1024 && consumed * 2 > buffer.count {
                    buffer.removeSubrange(..<consumed)
                    consumed = 0
                }
                return line
            }
            searched = buffer.count
            guard buffer.count - consumed <= Self.maxReplyBytes else {
                throw VMTemplateError(.invalidState, "the guest agent sent a line of more than \(Self.maxReplyBytes) bytes: it is not a reply vmtemplate accepts.")
            }
            guard try fill(until: deadline) else { return nil }
        }
    }

    /// Reads what there is into the buffer; false when the deadline passed first.
    private func fill(until deadline: ContinuousClock.Instant) throws -> Bool {
        guard try wait(for: Int16(POLLIN), until: deadline) else { return false }
        let count = receiveBuffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
        if count < 0 && (errno == EINTR || errno == EAGAIN) { return true }
        guard count > 0 else {
            throw VMTemplateError(.ioError, "the guest agent's channel '\(TerminalText.escape(path))' closed: QEMU stopped or another client took it.")
        }
        buffer += receiveBuffer[..<count]
        return true
    }

    /// Waits until the socket is ready for `events`; false when the deadline passed first.
    private func wait(for events: Int16, until deadline: ContinuousClock.Instant) throws -> Bool {
        let left = ContinuousClock.now.duration(to: deadline)
        guard left > .zero else { return false }
        var descriptor = pollfd(fd: fd, events: events, revents: 0)
        let milliseconds = Int32(clamping: max(1, left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000))
        let ready = poll(&descriptor, 1, milliseconds)
        if ready < 0 && errno == EINTR { return true }
        return ready > 0
    }
}
