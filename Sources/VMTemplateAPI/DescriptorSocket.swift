import CLinuxHost
import Foundation
import Synchronization
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
/// One thread serves it with poll(2), and never touches a received descriptor: a descriptor from
/// another user may make whoever inspects or closes it wait (a file on the sender's FUSE mount),
/// so each message is handled by a worker thread of its own, at most ``maxWorkers`` at once and
/// ``maxWorkersPerCaller`` per caller other than the owner; a connection is not read while its
/// caller has none free (its messages wait in the socket). Each connection has ``idleLimit``
/// between messages and ``lifetime`` in all; connections are bounded in all and per caller.
package final class DescriptorSocket: Sendable {
    static let maxConnections = 32
    static let maxConnectionsPerCaller = 8
    static let maxWorkers = 16
    static let maxWorkersPerCaller = 2
    static let idleLimit: Duration = .seconds(10)
    static let lifetime: Duration = .seconds(60)
    static let maxMessageBytes = 1024

    let listener: Int32
    /// A pipe: a byte on `wake[1]` wakes the poll loop (a worker finished, or ``stop()``).
    let wake: [Int32]
    package let boundPath: String
    private let state = Mutex<State>(State())

    struct State {
        var stopping = false
        /// Workers running, per caller.
        var workers: [uid_t: Int] = [:]
        /// Connections a worker answers on now: not read, not closed by the loop.
        var busy: Set<Int32> = []
        var total: Int { workers.values.reduce(0, +) }
    }

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
        state.withLock { $0.stopping = true }
        poke()
    }

    private func poke() {
        var one: UInt8 = 1
        _ = write(wake[1], &one, 1)
    }

    struct Connection {
        let uid: uid_t
        let isOwner: Bool
        var idleDeadline: ContinuousClock.Instant
        let deadline: ContinuousClock.Instant
    }

    /// Serves until ``stop()``: blocks its thread (run it on one of its own, not a task's).
    package func serve(deposits: DescriptorDeposits, callers: CallerPolicy, log: @escaping @Sendable (String) -> Void) {
        var connections: [Int32: Connection] = [:]
        let refusals = RefusalLog(log: log)
        // After accept(2) failed for want of descriptors: the listener rests a moment instead of
        // waking the loop at once, again and again.
        var listenerRestsUntil = ContinuousClock.now
        defer {
            // A connection a worker still answers on is the worker's to close.
            let busy = state.withLock { $0.busy }
            for fd in connections.keys where !busy.contains(fd) { close(fd) }
        }
        while true {
            let (stopping, busy, workers) = state.withLock { ($0.stopping, $0.busy, $0.workers) }
            if stopping { return }
            let now = ContinuousClock.now
            var watched = [pollfd(fd: wake[0], events: Int16(POLLIN), revents: 0)]
            if now >= listenerRestsUntil { watched.append(pollfd(fd: listener, events: Int16(POLLIN), revents: 0)) }
            // Read only where a worker could take the message.
            let total = workers.values.reduce(0, +)
            for (fd, connection) in connections where !busy.contains(fd) {
                let free = total < Self.maxWorkers && (connection.isOwner || workers[connection.uid, default: 0] < Self.maxWorkersPerCaller)
                watched.append(pollfd(fd: fd, events: free ? Int16(POLLIN) : 0, revents: 0))
            }
            let ready = poll(&watched, nfds_t(watched.count), 1000)
            if ready < 0 && errno != EINTR { log("descriptor socket: poll failed: \(errnoText()); no more deposits."); return }
            if watched[0].revents != 0 {
                var drain = [UInt8](repeating: 0, count: 64)
                while read(wake[0], &drain, drain.count) > 0 {}
            }
            for entry in watched.dropFirst() where entry.revents != 0 {
                if entry.fd == listener {
                    if !accept(into: &connections, callers: callers, refusals: refusals) { listenerRestsUntil = .now + .milliseconds(100) }
                    continue
                }
                guard let connection = connections[entry.fd] else { continue }
                if entry.revents & Int16(POLLIN) != 0, receive(on: entry.fd, from: connection, deposits: deposits, log: log) {
                    connections[entry.fd]?.idleDeadline = .now + Self.idleLimit
                } else if !state.withLock({ $0.busy.contains(entry.fd) }) {
                    close(entry.fd)
                    connections[entry.fd] = nil
                }
            }
            let later = ContinuousClock.now
            let busyNow = state.withLock { $0.busy }
            for (fd, connection) in connections where !busyNow.contains(fd) && (connection.idleDeadline <= later || connection.deadline <= later) {
                close(fd)
                connections[fd] = nil
            }
            deposits.sweep()
        }
    }

    /// Accepts one connection and admits its caller as the API would (``CallerPolicy``); a
    /// refused one is told why and closed. False when accept(2) failed for want of descriptors.
    private func accept(into connections: inout [Int32: Connection], callers: CallerPolicy, refusals: RefusalLog) -> Bool {
        let fd = clinuxhost_accept_nonblocking(listener)
        guard fd >= 0 else { return !(fd == -EMFILE || fd == -ENFILE || fd == -ENOBUFS || fd == -ENOMEM) }
        var credentials = clinuxhost_ucred()
        var length = socklen_t(MemoryLayout<clinuxhost_ucred>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &length) == 0 else {
            close(fd)
            return true
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
            refusals.note("descriptor socket: refused uid \(credentials.uid) pid \(credentials.pid): \(refusal.message)")
            Self.reply(ErrorBody(code: refusal.code, message: refusal.message), on: fd)
            close(fd)
            return true
        }
        if case .success(let isOwner) = caller {
            let now = ContinuousClock.now
            connections[fd] = Connection(uid: credentials.uid, isOwner: isOwner, idleDeadline: now + Self.idleLimit, deadline: now + Self.lifetime)
        }
        return true
    }

    /// Reads one message and hands it, with its descriptors, to a worker thread, which answers it;
    /// false when the connection is to be closed (its end, or an error reading it).
    private func receive(on fd: Int32, from connection: Connection, deposits: DescriptorDeposits, log: @escaping @Sendable (String) -> Void) -> Bool {
        var buffer = [UInt8](repeating: 0, count: Self.maxMessageBytes + 1)
        var descriptors = [Int32](repeating: -1, count: 253)
        var count: Int32 = 0
        let received = buffer.withUnsafeMutableBytes { raw in
            descriptors.withUnsafeMutableBufferPointer { clinuxhost_receive_descriptors(fd, raw.baseAddress, UInt(raw.count), $0.baseAddress, 253, &count) }
        }
        if received == -Int(EAGAIN) || received == -Int(EINTR) { return true }
        let message = received > 0 ? Array(buffer[0..<Int(received)]) : []
        let given = Array(descriptors[0..<Int(count)])
        guard received > 0 else {
            // The end (or an error): descriptors that came anyway are closed by a worker.
            if !given.isEmpty { Self.closing(given) }
            return false
        }
        state.withLock { state in
            state.workers[connection.uid, default: 0] += 1
            state.busy.insert(fd)
        }
        let thread = Thread { [self] in
            self.answer(message, descriptors: given, on: fd, from: connection, deposits: deposits, log: log)
            self.state.withLock { state in
                state.workers[connection.uid, default: 1] -= 1
                if state.workers[connection.uid] == 0 { state.workers[connection.uid] = nil }
                state.busy.remove(fd)
            }
            self.poke()
        }
        thread.stackSize = 1 << 20
        thread.start()
        return true
    }

    /// Closes descriptors on a thread of its own (a close may wait on another user's file system).
    static func closing(_ descriptors: [Int32]) {
        let thread = Thread { for descriptor in descriptors { close(descriptor) } }
        thread.stackSize = 64 << 10
        thread.start()
    }

    /// A worker: inspects the one descriptor, deposits it, answers on `fd`.
    private func answer(_ message: [UInt8], descriptors: [Int32], on fd: Int32, from connection: Connection, deposits: DescriptorDeposits, log: (String) -> Void) {
        var unused = descriptors
        defer { for descriptor in unused { close(descriptor) } }
        let answer: any Encodable
        var token: String?
        do {
            guard message.count <= Self.maxMessageBytes else {
                throw VMTemplateError(.invalidArgument, "a message is at most \(Self.maxMessageBytes) bytes: send {} or {\"kind\": \"tap\"} with the descriptor.")
            }
            let request = try Self.request(message)
            guard let descriptor = descriptors.first else {
                throw VMTemplateError(.invalidArgument, "the message came without a descriptor: attach exactly one (SCM_RIGHTS) to each message.")
            }
            guard descriptors.count == 1 else {
                throw VMTemplateError(.invalidArgument, "the message came with \(descriptors.count) descriptors: attach exactly one to each message; none was kept.")
            }
            let newToken = DescriptorDeposits.newToken()
            let given = try GivenDescriptor.adopting(descriptor, label: "descriptor \(newToken.prefix(11))…", fromOwner: connection.isOwner)
            // The object owns it now, and closes it when it goes.
            unused = []
            if let request, request != given.kind {
                throw VMTemplateError(.invalidArgument, "the descriptor is a \(given.kind.rawValue), not the \(request.rawValue) the message says: nothing was kept.")
            }
            try deposits.deposit(given, token: newToken, uid: connection.uid, isOwner: connection.isOwner)
            token = newToken
            log("descriptor socket: uid \(connection.uid) deposited a \(given.kind.rawValue)\(given.tapName.map { " (tap \($0))" } ?? "") as \(newToken.prefix(11))…")
            answer = Deposited(token: newToken, given: given, lifetime: deposits.lifetime)
        } catch {
            let failure = error as? VMTemplateError ?? VMTemplateError(.internalError, VMTemplateError.oneLine(error))
            answer = ErrorBody(code: failure.code, message: failure.message)
        }
        // A token its depositor never got would only hold a place until it expires.
        if !Self.reply(answer, on: fd), let token { deposits.withdraw(token) }
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
    static func reply(_ body: some Encodable, on fd: Int32) -> Bool {
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

/// Refusal lines for the log, at most one a second (the rest counted): a caller that connects in a
/// loop cannot flood the server's log.
final class RefusalLog: Sendable {
    let log: @Sendable (String) -> Void
    private let state = Mutex<(last: ContinuousClock.Instant?, skipped: Int)>((nil, 0))

    init(log: @escaping @Sendable (String) -> Void) {
        self.log = log
    }

    func note(_ line: String) {
        let (write, skipped) = state.withLock { state -> (Bool, Int) in
            let now = ContinuousClock.now
            if let last = state.last, now < last + .seconds(1) {
                state.skipped += 1
                return (false, 0)
            }
            let skipped = state.skipped
            state = (now, 0)
            return (true, skipped)
        }
        if write { log(skipped > 0 ? "\(line) (and \(skipped) refusals not logged)" : line) }
    }
}
