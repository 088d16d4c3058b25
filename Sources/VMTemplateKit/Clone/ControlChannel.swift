import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore
import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A clone's control channel: the guest's second serial port, served by QEMU as a Unix socket.
/// The protocol is the guest's own; the built-in busybox guest answers one line per request line
/// (templates/busybox/README.md).
public struct ControlChannel: Sendable {
    public let path: String
    /// The store the socket is in, when it may be another user's: then nothing below it is
    /// followed as a link (``UnixSocketAddress/connectStream(beneath:relativePath:until:)``).
    public let storeRoot: String?
    /// The longest reply line accepted: a protocol line is a word or a few (64 skipped ones of
    /// this size bound what a guest can make a caller hold).
    public static let maxReplyBytes = 64 * 1024
    /// How long a connection may wait for room in QEMU's backlog.
    public static let connectTimeout = Duration.seconds(5)

    public init(path: String, storeRoot: String? = nil) {
        self.path = path
        self.storeRoot = storeRoot
    }

    /// The longest request line accepted (without its newline).
    public static let maxRequestBytes = 4096
    /// Stale lines `exchange` skips at most before its own reply.
    static let maxSkippedLines = 64

    /// Sends `line` and returns the guest's one-line reply (without the line ending).
    public func request(_ line: String, timeout: Duration = .seconds(20)) throws -> String {
        try requests([line], timeout: timeout)[0]
    }

    /// Refuses a request line the protocol cannot carry as one request: a control character (a
    /// newline would smuggle in a second request), or more than ``maxRequestBytes``.
    public static func check(_ line: String) throws {
        let shown = TerminalText.escape(String(line.prefix(64)))
        guard line.utf8.count <= maxRequestBytes else {
            throw VMTemplateError(.invalidArgument, "the request '\(shown)…' is \(line.utf8.count) bytes; one request line is at most \(maxRequestBytes): send less at a time.")
        }
        guard !line.isEmpty, !line.utf8.contains(where: { $0 < 0x20 || $0 == 0x7f }) else {
            throw VMTemplateError(.invalidArgument, "the request '\(shown)' is empty or holds a control character (a newline, NUL, tab…): send one line of printable text per request.")
        }
    }

    /// One request as a caller outside vmtemplate makes it (`vmtemplate send`): checked
    /// (``check(_:)``), framed by a fresh `sync TOKEN` whose echo marks where this caller's reply
    /// starts, so a late reply meant for an earlier caller is skipped (templates/busybox/README.md).
    public func exchange(_ line: String, timeout: Duration = .seconds(20)) throws -> String {
        try Self.check(line)
        let token = "sync \((0..<8).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined())"
        let fd = try connect()
        defer { close(fd) }
        try send([token, line], on: fd)
        // Earlier callers' replies are skipped: at most 64 lines (each at most maxReplyBytes), so
        // a guest that never echoes can neither hold this caller nor fill its memory.
        let lines = try replies(Self.maxSkippedLines + 2, on: fd, to: [line], timeout: timeout) { received in
            guard let echo = received.firstIndex(of: token) else { return false }
            return received.count > echo + 1
        }
        guard let echo = lines.firstIndex(of: token), lines.count > echo + 1 else {
            throw VMTemplateError(.invalidState, "the guest on '\(path)' did not echo 'sync' within \(Self.maxSkippedLines) lines: it does not speak the control protocol's framing (templates/busybox/README.md).")
        }
        return lines[echo + 1]
    }

    /// Sends `lines` in one write on one connection and returns the guest's reply to each, in
    /// order, within one deadline for all of them.
    public func requests(_ lines: [String], timeout: Duration = .seconds(20)) throws -> [String] {
        let fd = try connect()
        defer { close(fd) }
        try send(lines, on: fd)
        return try replies(lines.count, on: fd, to: lines, timeout: timeout)
    }

    /// A connection to the channel (close-on-exec). QEMU serves one client at a time: a second
    /// connection is accepted only when the first has closed, so what it sends is read after.
    public func connect() throws -> Int32 {
        guard let connected = UnixSocketAddress.connectStream(path: path, storeRoot: storeRoot, until: .now + Self.connectTimeout) else {
            throw VMTemplateError(.invalidArgument, "control socket path '\(path)' is empty or too long for a Unix socket.")
        }
        switch connected {
        case .success(let fd):
            return fd
        case .failure(let error) where error.code == ELOOP || error.code == EXDEV:
            throw VMTemplateError(.permissionDenied, "the control channel '\(TerminalText.escape(path))' is reached through a link: a store's sockets never are, so nothing was sent; check who changed that store.", cause: error)
        case .failure(let error):
            throw VMTemplateError(.ioError, "cannot connect to the control channel '\(path)': \(errnoText(error.code)). Is the clone running (vmtemplate list)?", cause: error)
        }
    }

    /// Writes `lines`, each ended by a newline, in one write.
    public func send(_ lines: [String], on fd: Int32) throws {
        let bytes = Array(lines.map { $0 + "\n" }.joined().utf8)
        let written = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        guard written == bytes.count else {
            throw VMTemplateError(.ioError, "cannot send to the control channel '\(path)': \(errnoText()).", cause: SystemCallError("send"))
        }
    }

    /// Reads `count` reply lines from `fd` within one deadline (`requests` only names them in
    /// errors), or fewer once `enough` says the lines so far suffice.
    public func replies(_ count: Int, on fd: Int32, to requests: [String] = [], timeout: Duration, until enough: ([String]) -> Bool = { _ in false }) throws -> [String] {
        let shown = TerminalText.escape(requests.joined(separator: "; "))
        let deadline = ContinuousClock.now + timeout
        // One deadline for all replies and a bounded length: a guest that trickles bytes or never
        // ends its line cannot hold this process or fill its memory.
        var replies: [String] = []
        var reply: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while replies.count < count && !enough(replies) {
            let remaining = ContinuousClock.now.duration(to: deadline)
            guard remaining > .zero else {
                throw VMTemplateError(.timeout, "the guest did not answer '\(shown)' on '\(path)' within \(timeout.shortText).")
            }
            var descriptor = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let milliseconds = Int32(clamping: remaining.components.seconds * 1000 + remaining.components.attoseconds / 1_000_000_000_000_000 + 1)
            let ready = poll(&descriptor, 1, milliseconds)
            if ready < 0 && errno == EINTR { continue }
            guard ready > 0 else { continue }
            let received = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if received < 0 && errno == EINTR { continue }
            guard received > 0 else {
                throw VMTemplateError(.ioError, "the control channel '\(path)' closed before the guest answered '\(shown)'.")
            }
            var done = false
            for byte in chunk[0..<received] where !done {
                if byte == 0x0a {
                    replies.append(String(decoding: reply, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))
                    reply = []
                    // Asked only when a line completes, not for every byte.
                    done = replies.count >= count || enough(replies)
                } else {
                    reply.append(byte)
                }
            }
            guard reply.count <= Self.maxReplyBytes else {
                throw VMTemplateError(.invalidState, "the guest's reply to '\(shown)' on '\(path)' is longer than \(Self.maxReplyBytes) bytes without ending its line: not a reply of this protocol.")
            }
        }
        return replies
    }
}
