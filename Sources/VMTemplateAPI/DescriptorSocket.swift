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

/// `serve`'s descriptor socket: a `SOCK_SEQPACKET` Unix socket beside the API's
/// (``ServerFiles/descriptorSocketPath(beside:)``), with the same mode, group and callers. A
/// caller sends one message, `{}` or `{"kind": "tap"|"disk"}`, with one descriptor attached
/// (`SCM_RIGHTS`); the answer is one message: `{"token": "fd-…", "kind", …}` or `{"error":
/// {"code", "message"}}`. The token then names the descriptor in an API request
/// (``DescriptorDeposits``). HTTP (and SwiftNIO under Hummingbird) carries no descriptors, hence
/// a socket of its own; message boundaries keep each descriptor with its message.
///
/// One thread serves it with poll(2): every call is non-blocking, each connection has
/// ``idleLimit`` between messages, and connections are bounded in all and per caller.
package final class DescriptorSocket: Sendable {
    static let maxConnections = 32
    static let maxConnectionsPerCaller = 8
    static let idleLimit: Duration = .seconds(10)
    static let maxMessageBytes = 1024

    let listener: Int32
    /// A pipe: ``stop()`` writes to `wake[1]`, ``serve(deposits:callers:log:)`` polls `wake[0]`.
    let wake: [Int32]
    package let boundPath: String

    /// Binds a new socket at `boundPath` (in the server's private directory; published later).
    package init(boundAt boundPath: String) throws {
        let listener = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard listener >= 0 else { throw VMTemplateError(.ioError, "cannot make the descriptor socket: \(errnoText()).", cause: SystemCallError("socket")) }
        guard let address = UnixSocketAddress(path: boundPath) else {
            close(listener)
            throw VMTemplateError(.invalidArgument, "the descriptor socket's path '\(TerminalText.escape(boundPath))' is too long for a Unix socket.")
        }
        let bound = address.withSockaddr { bind(listener, $0, $1) }
        guard bound == 0, Glibc.listen(listener, 64) == 0 else {
            let code = errno
            close(listener)
            throw VMTemplateError(.ioError, "cannot bind the descriptor socket: \(errnoText(code)).", cause: SystemCallError("bind", code: code))
        }
        var wake: [Int32] = [-1, -1]
        let piped = clinuxhost_pipe_nonblocking(&wake)
        guard piped == 0 else {
            close(listener)
            throw VMTemplateError(.ioError, "cannot make a pipe: \(errnoText(-piped)).", cause: SystemCallError("pipe2", code: -piped))
        }
        self.listener = listener
        self.wake = wake
        self.boundPath = boundPath
    }

    deinit {
        close(listener)
        wake.forEach { close($0) }
    }

    /// Makes ``serve(deposits:callers:log:)`` return.
    package func stop() {
        var one: UInt8 = 1
        _ = write(wake[1], &one, 1)
    }

    struct Connection {
        let uid: uid_t
        let isOwner: Bool
        var deadline: ContinuousClock.Instant
    }

    /// Serves until ``stop()``: blocks its thread (run it on one of its own, not a task's).
    package func serve(deposits: DescriptorDeposits, callers: CallerPolicy, log: @Sendable (String) -> Void) {
        var connections: [Int32: Connection] = [:]
        defer { for fd in connections.keys { close(fd) } }
        while true {
            var watched = [pollfd(fd: wake[0], events: Int16(POLLIN), revents: 0), pollfd(fd: listener, events: Int16(POLLIN), revents: 0)]
            watched += connections.keys.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            let ready = poll(&watched, nfds_t(watched.count), 1000)
            if ready < 0 && errno != EINTR { log("descriptor socket: poll failed: \(errnoText()); no more deposits."); return }
            if watched[0].revents != 0 { return }
            if watched[1].revents & Int16(POLLIN) != 0 { accept(into: &connections, callers: callers, log: log) }
            for entry in watched.dropFirst(2) where entry.revents != 0 {
                guard let connection = connections[entry.fd] else { continue }
                if entry.revents & Int16(POLLIN) != 0, receive(on: entry.fd, from: connection, deposits: deposits, log: log) {
                    connections[entry.fd]?.deadline = .now + Self.idleLimit
                } else {
                    close(entry.fd)
                    connections[entry.fd] = nil
                }
            }
            let now = ContinuousClock.now
            for (fd, connection) in connections where connection.deadline <= now {
                close(fd)
                connections[fd] = nil
            }
            deposits.sweep()
        }
    }

    /// Accepts one connection and admits its caller as the API would (``CallerPolicy``); a
    /// refused one is told why and closed.
    private func accept(into connections: inout [Int32: Connection], callers: CallerPolicy, log: (String) -> Void) {
        let fd = clinuxhost_accept_nonblocking(listener)
        guard fd >= 0 else { return }
        var credentials = clinuxhost_ucred()
        var length = socklen_t(MemoryLayout<clinuxhost_ucred>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &length) == 0 else {
            close(fd)
            return
        }
        var pidfd: Int32 = -1
        var pidfdLength = socklen_t(MemoryLayout<Int32>.size)
        let groups: Set<gid_t>
        if getsockopt(fd, SOL_SOCKET, CallerCheck.peerPIDFDOption, &pidfd, &pidfdLength) == 0, pidfd >= 0 {
            groups = CallerCheck.groups(of: credentials.pid, through: pidfd)
            close(pidfd)
        } else {
            groups = []
        }
        let caller = callers.admit(uid: credentials.uid, groups: groups.union([credentials.gid]))
        let ofThisCaller = connections.values.count { $0.uid == credentials.uid }
        let refusal: VMTemplateError? = switch caller {
        case .failure(let error): error
        case .success where connections.count >= Self.maxConnections:
            VMTemplateError(.limitExceeded, "the descriptor socket serves \(Self.maxConnections) connections already: close one, or try again.")
        case .success(let isOwner) where !isOwner && ofThisCaller >= Self.maxConnectionsPerCaller:
            VMTemplateError(.limitExceeded, "uid \(credentials.uid) has \(Self.maxConnectionsPerCaller) connections to the descriptor socket already: deposit several descriptors over one.")
        case .success: nil
        }
        if let refusal {
            log("descriptor socket: refused uid \(credentials.uid) pid \(credentials.pid): \(refusal.message)")
            reply(ErrorBody(code: refusal.code, message: refusal.message), on: fd)
            close(fd)
            return
        }
        if case .success(let isOwner) = caller {
            connections[fd] = Connection(uid: credentials.uid, isOwner: isOwner, deadline: .now + Self.idleLimit)
        }
    }

    /// Reads one message and answers it; false when the connection is to be closed (its end, or
    /// an error reading it).
    private func receive(on fd: Int32, from connection: Connection, deposits: DescriptorDeposits, log: (String) -> Void) -> Bool {
        var buffer = [UInt8](repeating: 0, count: Self.maxMessageBytes + 1)
        var descriptor: Int32 = -1
        var count: Int32 = 0
        let received = buffer.withUnsafeMutableBytes { clinuxhost_receive_with_fd(fd, $0.baseAddress, UInt($0.count), &descriptor, &count) }
        if received == -Int(EAGAIN) || received == -Int(EINTR) { return true }
        guard received > 0 else {
            if descriptor >= 0 { close(descriptor) }
            return false
        }
        let answer: any Encodable
        do {
            guard received <= Self.maxMessageBytes else {
                throw VMTemplateError(.invalidArgument, "a message is at most \(Self.maxMessageBytes) bytes: send {} or {\"kind\": \"tap\"} with the descriptor.")
            }
            let request = try Self.request(Array(buffer[0..<Int(received)]))
            guard descriptor >= 0 else {
                throw VMTemplateError(.invalidArgument, "the message came without a descriptor: attach exactly one (SCM_RIGHTS) to each message.")
            }
            guard count == 1 else {
                throw VMTemplateError(.invalidArgument, "the message came with \(count) descriptors: attach exactly one to each message; none was kept.")
            }
            let token = DescriptorDeposits.newToken()
            let given = try GivenDescriptor.adopting(descriptor, label: "descriptor \(token.prefix(11))…")
            // The object owns it now, and closes it when it goes.
            descriptor = -1
            if let request, request != given.kind {
                throw VMTemplateError(.invalidArgument, "the descriptor is a \(given.kind.rawValue), not the \(request.rawValue) the message says: nothing was kept.")
            }
            try deposits.deposit(given, token: token, uid: connection.uid, isOwner: connection.isOwner)
            log("descriptor socket: uid \(connection.uid) deposited a \(given.kind.rawValue)\(given.tapName.map { " (tap \($0))" } ?? "") as \(token.prefix(11))…")
            answer = Deposited(token: token, given: given, lifetime: deposits.lifetime)
        } catch {
            if descriptor >= 0 { close(descriptor) }
            let failure = error as? VMTemplateError ?? VMTemplateError(.internalError, VMTemplateError.oneLine(error))
            answer = ErrorBody(code: failure.code, message: failure.message)
        }
        return reply(answer, on: fd)
    }

    /// The kind a message asks for (nil: whatever the descriptor is).
    static func request(_ bytes: [UInt8]) throws -> GivenDescriptor.Kind? {
        let text = String(decoding: bytes, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard case .object(let fields)? = try? JSONCoding.decoder().decode(JSONValue.self, from: Data(text.utf8)) else {
            throw VMTemplateError(.invalidArgument, "the message is not a JSON object: send {} or {\"kind\": \"tap\"} (or \"disk\") with the descriptor.")
        }
        guard fields.keys.allSatisfy({ $0 == "kind" }) else {
            throw VMTemplateError(.invalidArgument, "the message may hold only \"kind\" (\"tap\" or \"disk\").")
        }
        guard let kind = fields["kind"] else { return nil }
        guard let name = kind.stringValue, let known = GivenDescriptor.Kind(rawValue: name) else {
            throw VMTemplateError(.invalidArgument, "\"kind\" is \"tap\" or \"disk\".")
        }
        return known
    }

    /// Sends `body` as one message; false if it could not be (the peer went, or does not read).
    @discardableResult
    private func reply(_ body: some Encodable, on fd: Int32) -> Bool {
        guard var data = try? JSONCoding.encode(body) else { return false }
        data.append(0x0a)
        let sent = data.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT)) }
        return sent == data.count
    }
}

/// The answer to a deposit: the token, and what the kernel says the descriptor is.
package struct Deposited: Codable, Sendable {
    package var token: String
    package var kind: String
    /// A tap's interface.
    package var tap: String?
    /// A disk's access mode: true for read-write.
    package var writable: Bool?
    package var blockDevice: Bool?
    package var expiresInSeconds: Int

    enum CodingKeys: String, CodingKey {
        case token, kind, tap, writable
        case blockDevice = "block_device"
        case expiresInSeconds = "expires_in_seconds"
    }

    init(token: String, given: GivenDescriptor, lifetime: Duration) {
        self.token = token
        kind = given.kind.rawValue
        tap = given.kind == .tap ? given.tapName : nil
        writable = given.kind == .disk ? given.writable : nil
        blockDevice = given.kind == .disk ? given.isBlockDevice : nil
        expiresInSeconds = Int(lifetime.components.seconds)
    }
}
