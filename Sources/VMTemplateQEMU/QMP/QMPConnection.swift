import CLinuxHost
import VMTemplateOS
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Foundation
import Synchronization

enum IncomingMessage: Decodable {
    case greeting(QMPGreeting)
    case event(QMPEvent)
    /// `id` is nil when QEMU could not parse the request well enough to echo it.
    case reply(id: Int?, error: ErrorBody?)

    struct ErrorBody: Decodable {
        let errorClass: String
        let desc: String

        enum CodingKeys: String, CodingKey {
            case errorClass = "class"
            case desc
        }

        init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            errorClass = try container.decodeIfPresent(String.self, forKey: .errorClass) ?? "GenericError"
            desc = try container.decodeIfPresent(String.self, forKey: .desc) ?? "(no description)"
        }
    }

    private enum CodingKeys: String, CodingKey {
        case qmp = "QMP"
        case event
        case `return`
        case error
        case id
    }

    init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        if container.contains(.qmp) {
            self = .greeting(try container.decode(QMPGreeting.self, forKey: .qmp))
        } else if container.contains(.event) {
            self = .event(try QMPEvent(from: decoder))
        } else if container.contains(.return) || container.contains(.error) {
            // This client only sends integer ids; anything else is not ours to route.
            let id = try? container.decodeIfPresent(Int.self, forKey: .id)
            self = .reply(id: id, error: try container.decodeIfPresent(ErrorBody.self, forKey: .error))
        } else {
            throw DecodingError.dataCorrupted(
                .init(codingPath: [], debugDescription: "Not a QMP greeting, event or reply"))
        }
    }
}

// MARK: - Connection

/// What a waiter receives.
enum Delivery: Sendable {
    case greeting(QMPGreeting)
    case reply(Data)
    case event(QMPEvent)
}

/// Somebody waiting for a greeting, a reply, or an event.
///
/// The result may come from the reader thread, a timer, task cancellation or closing; the first
/// one wins and later ones are ignored, so a reply or event is never both handed out and reported
/// as timed out. It may also come before the waiting task has suspended, so it is held until then.
struct Waiter {
    enum Purpose {
        case greeting
        case reply(command: String, closeMeansSuccess: Bool)
        case event(name: String, predicate: @Sendable (QMPEvent) -> Bool)

        var activity: String {
            switch self {
            case .greeting: "the QMP greeting"
            case .reply(let command, _): "the reply to '\(command)'"
            case .event(let name, _): "the QMP event '\(name)'"
            }
        }
    }

    enum Stage {
        /// Registered; the task has not suspended yet.
        case reserved
        case suspended(CheckedContinuation<Delivery, any Error>)
        /// The result arrived before the task suspended.
        case delivered(Result<Delivery, any Error>)
    }

    let purpose: Purpose
    var stage: Stage = .reserved

    var isOpen: Bool {
        if case .delivered = stage { return false }
        return true
    }
}

/// Why the connection ended.
enum CloseReason {
    case peerClosed(detail: SystemCallError?)
    case clientClosed

    func error(socketPath: String, waitingFor activity: String) -> VMTemplateError {
        switch self {
        case .peerClosed(let detail):
            VMTemplateError(
                .qemuFailed,
                "The QMP connection to \(socketPath) closed while waiting for \(activity); "
                    + "QEMU has probably exited.",
                cause: detail)
        case .clientClosed:
            VMTemplateError(
                .ioError, "The QMP client for \(socketPath) was closed while waiting for \(activity).")
        }
    }

    func error(socketPath: String, sending command: String) -> VMTemplateError {
        switch self {
        case .peerClosed(let detail):
            VMTemplateError(
                .qemuFailed,
                "Cannot send the QMP command '\(command)': the connection to \(socketPath) has closed; "
                    + "QEMU has probably exited.",
                cause: detail)
        case .clientClosed:
            VMTemplateError(
                .ioError,
                "Cannot send the QMP command '\(command)': the QMP client for \(socketPath) was closed.")
        }
    }
}

/// Everything the reader thread and the calling tasks share, behind one lock.
struct SharedState {
    static let greetingKey = 0

    let socketPath: String
    /// Keys for waiters; for replies the key is the request's QMP `id`.
    var nextKey = greetingKey + 1
    /// The greeting waiter exists from the start, so a greeting read before `connect` waits for
    /// it is kept.
    var waiters: [Int: Waiter] = [greetingKey: Waiter(purpose: .greeting)]
    /// Every event, for `receivedEvents`. Grows for the life of the connection; QEMU sends few
    /// events in this project's use.
    var history: [QMPEvent] = []
    /// Events nobody has taken yet, oldest first.
    var unconsumed: [QMPEvent] = []
    var closeReason: CloseReason?

    init(socketPath: String) {
        self.socketPath = socketPath
    }

    mutating func reserve(_ purpose: Waiter.Purpose) -> Int {
        let key = nextKey
        nextKey += 1
        waiters[key] = Waiter(purpose: purpose)
        return key
    }

    /// Hands `result` to the waiter `key` unless it already has one; returns whether it took it.
    @discardableResult
    mutating func resolve(_ key: Int, _ result: Result<Delivery, any Error>) -> Bool {
        guard var waiter = waiters[key] else { return false }
        switch waiter.stage {
        case .reserved:
            waiter.stage = .delivered(result)
            waiters[key] = waiter
        case .suspended(let continuation):
            waiters[key] = nil
            continuation.resume(with: result)
        case .delivered:
            return false
        }
        return true
    }

    /// Parks the waiting task, or resumes it at once if its result is already here.
    mutating func suspend(_ key: Int, _ continuation: CheckedContinuation<Delivery, any Error>) {
        switch waiters[key]?.stage {
        case .reserved?:
            waiters[key]?.stage = .suspended(continuation)
        case .delivered(let result)?:
            waiters[key] = nil
            continuation.resume(with: result)
        case .suspended?, nil:
            // Each waiter is suspended exactly once, by the task that reserved it.
            continuation.resume(
                throwing: VMTemplateError(.internalError, "QMP waiter \(key) suspended twice or unknown."))
        }
    }

    /// Forgets a waiter, e.g. the reply waiter of a request that could not be sent.
    mutating func remove(_ key: Int) {
        waiters[key] = nil
    }

    mutating func deliverReply(id: Int, line: Data, error: IncomingMessage.ErrorBody?) {
        guard let waiter = waiters[id], case .reply(let command, _) = waiter.purpose else { return }
        if let error {
            resolve(id, .failure(QMPError(command: command, errorClass: error.errorClass, desc: error.desc)))
        } else {
            resolve(id, .success(.reply(line)))
        }
    }

    /// Gives `event` to the oldest open waiter that wants it, or buffers it for a later one.
    mutating func deliver(_ event: QMPEvent) {
        // Bounded: a QEMU that floods events cannot grow this process without limit.
        if history.count >= 1024 { history.removeFirst(512) }
        if unconsumed.count >= 1024 { unconsumed.removeFirst(512) }
        history.append(event)
        for key in waiters.keys.sorted() {
            guard let waiter = waiters[key], waiter.isOpen,
                case .event(let name, let predicate) = waiter.purpose,
                name == event.name, predicate(event)
            else { continue }
            resolve(key, .success(.event(event)))
            return
        }
        unconsumed.append(event)
    }

    enum EventLookup {
        case found(QMPEvent)
        case reserved(Int)
    }

    /// Takes a buffered event if one matches, else registers a waiter for a future one.
    mutating func takeOrReserveEvent(
        named name: String, matching predicate: @escaping @Sendable (QMPEvent) -> Bool
    ) throws -> EventLookup {
        if let index = unconsumed.firstIndex(where: { $0.name == name && predicate($0) }) {
            return .found(unconsumed.remove(at: index))
        }
        if let closeReason {
            throw closeReason.error(socketPath: socketPath, waitingFor: "the QMP event '\(name)'")
        }
        return .reserved(reserve(.event(name: name, predicate: predicate)))
    }

    /// Fails every open waiter (a `quit` reply succeeds if QEMU hung up) and refuses new ones.
    mutating func close(_ reason: CloseReason) {
        guard closeReason == nil else { return }
        closeReason = reason
        for (key, waiter) in waiters where waiter.isOpen {
            if case .reply(_, closeMeansSuccess: true) = waiter.purpose, case .peerClosed = reason {
                resolve(key, .success(.reply(Data(#"{"return": {}}"#.utf8))))
            } else {
                resolve(key, .failure(reason.error(socketPath: socketPath, waitingFor: waiter.purpose.activity)))
            }
        }
    }
}

/// The socket, its reader thread, and the waiters. Kept apart from `QMPClient` so that the reader
/// thread does not keep the client alive: dropping the last `QMPClient` reference closes the
/// connection, which ends the thread.
final class Connection: Sendable {
    let socketPath: String
    private let fd: Int32
    /// Whether `fd` is open. Senders write while holding this lock and the reader thread closes
    /// the descriptor under it, so nobody writes to a descriptor number that was closed and
    /// perhaps reused by an unrelated `open`.
    private let descriptorOpen = Mutex(true)
    private let state: Mutex<SharedState>

    init(fd: Int32, socketPath: String) {
        self.fd = fd
        self.socketPath = socketPath
        self.state = Mutex(SharedState(socketPath: socketPath))
    }

    var receivedEvents: [QMPEvent] {
        state.withLock { $0.history }
    }

    // MARK: Waiting

    func greeting(timeout: Duration) async throws -> QMPGreeting {
        let delivery = try await wait(
            for: SharedState.greetingKey, timeout: timeout,
            timeoutError: VMTemplateError(.timeout, "QEMU sent no QMP greeting on \(socketPath)."))
        guard case .greeting(let greeting) = delivery else { throw Self.mismatch }
        return greeting
    }

    func reserveReply(to command: String, closeMeansSuccess: Bool) throws -> Int {
        try state.withLock { state in
            if let reason = state.closeReason {
                throw reason.error(socketPath: socketPath, sending: command)
            }
            return state.reserve(.reply(command: command, closeMeansSuccess: closeMeansSuccess))
        }
    }

    /// Forgets a reply waiter whose request was never sent.
    func abandon(_ id: Int) {
        state.withLock { $0.remove(id) }
    }

    /// Registers a reply waiter for each command (before writing, so even an immediate reply has
    /// somewhere to go), then writes them all at once. Returns their ids, in order.
    func sendAll(_ commands: [QMPCommand], passing descriptor: Int32? = nil) throws -> [(id: Int, command: String)] {
        var sent: [(id: Int, command: String)] = []
        var bytes = Data()
        do {
            for command in commands {
                let id = try reserveReply(to: command.name, closeMeansSuccess: command.closeMeansSuccess)
                sent.append((id, command.name))
                do {
                    bytes.append(try command.encode(id))
                } catch {
                    throw VMTemplateError(
                        .invalidArgument, "Could not encode the arguments of the QMP command '\(command.name)'.",
                        cause: error)
                }
            }
            try send(bytes, command: commands.map(\.name).joined(separator: ", "), passing: descriptor)
        } catch {
            for (id, _) in sent { abandon(id) }
            throw error
        }
        return sent
    }

    func reply(to id: Int, command: String, timeout: Duration) async throws -> Data {
        let delivery = try await wait(
            for: id, timeout: timeout,
            timeoutError: VMTemplateError(
                .timeout, "The QMP command '\(command)' got no reply within \(timeout.shortText) on \(socketPath)."))
        guard case .reply(let line) = delivery else { throw Self.mismatch }
        return line
    }

    func event(
        named name: String, matching predicate: @escaping @Sendable (QMPEvent) -> Bool, timeout: Duration
    ) async throws -> QMPEvent {
        let key: Int
        switch try state.withLock({ try $0.takeOrReserveEvent(named: name, matching: predicate) }) {
        case .found(let event):
            return event
        case .reserved(let reserved):
            key = reserved
        }
        let delivery = try await wait(
            for: key, timeout: timeout,
            timeoutError: VMTemplateError(
                .timeout, "The QMP event '\(name)' did not arrive within \(timeout.shortText) on \(socketPath)."))
        guard case .event(let event) = delivery else { throw Self.mismatch }
        return event
    }

    /// Suspends until the waiter `key` gets its result.
    ///
    /// The timer and task cancellation resolve the waiter just as a reply would, and only the
    /// first result counts; so, for example, an event that arrives as the timer fires is either
    /// returned or left in the buffer for the next waiter, never dropped.
    private func wait(for key: Int, timeout: Duration, timeoutError: VMTemplateError) async throws -> Delivery {
        let timer = Task { [self] in
            do {
                try await Task.sleep(for: timeout)
            } catch {
                return  // cancelled: the result arrived first
            }
            state.withLock { _ = $0.resolve(key, .failure(timeoutError)) }
        }
        defer { timer.cancel() }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { continuation in
                state.withLock { $0.suspend(key, continuation) }
            }
        } onCancel: {
            state.withLock { _ = $0.resolve(key, .failure(CancellationError())) }
        }
    }

    private static let mismatch = VMTemplateError(.internalError, "A QMP waiter received the wrong kind of message.")
    static let maxLineBytes = 16 << 20

    // MARK: Writing

    func send(_ line: Data, command: String, passing descriptor: Int32? = nil) throws {
        let failure: Int32? = descriptorOpen.withLock { open in
            guard open else { return EBADF }
            return line.withUnsafeBytes { bytes in
                guard let descriptor, let base = bytes.baseAddress, bytes.count > 0 else { return UnixSocket.sendAll(fd, bytes) }
                // The descriptor travels with the first byte (SCM_RIGHTS); QEMU keeps it for the
                // command that asks for it (`add-fd`, `getfd`).
                let sent = clinuxhost_send_with_fd(fd, base, UInt(bytes.count), descriptor)
                guard sent >= 0 else { return Int32(-sent) }
                return UnixSocket.sendAll(fd, UnsafeRawBufferPointer(rebasing: bytes[sent...]))
            }
        }
        guard let code = failure else { return }
        if let reason = state.withLock({ $0.closeReason }) {
            throw reason.error(socketPath: socketPath, sending: command)
        }
        if code == EPIPE || code == ECONNRESET {
            throw CloseReason.peerClosed(detail: SystemCallError("send", code: code)).error(socketPath: socketPath, sending: command)
        }
        throw VMTemplateError(
            .ioError, "Could not send the QMP command '\(command)' to \(socketPath).", cause: SystemCallError("send", code: code))
    }

    // MARK: Reading

    func startReader() {
        let thread = Thread { [self] in
            readLoop()
        }
        thread.name = "QMP reader"
        thread.start()
    }

    /// Runs on the reader thread until the peer hangs up or `close()` shuts the socket down.
    private func readLoop() {
        var lines = LineBuffer()
        let decoder = JSONDecoder()
        var chunk = [UInt8](repeating: 0, count: 64 * 1024)
        var failure: SystemCallError?
        while true {
            let (count, code) = chunk.withUnsafeMutableBytes { buffer in
                let count = read(fd, buffer.baseAddress, buffer.count)
                return (count, count < 0 ? errno : 0)
            }
            if count > 0 {
                chunk.withUnsafeBytes { lines.append(UnsafeRawBufferPointer(rebasing: $0[..<count])) }
                while let line = lines.nextLine() {
                    dispatch(line, decoder: decoder)
                }
                // No QMP message comes near this (query-qmp-schema is ~200 KiB): whatever sends
                // more without a newline is not a QMP server to keep reading from.
                if lines.pendingCount > Self.maxLineBytes {
                    failure = SystemCallError("read", code: EMSGSIZE)
                    break
                }
            } else if count == 0 {
                break
            } else if code != EINTR {
                failure = SystemCallError("read", code: code)
                break
            }
        }
        if let line = lines.remainder() {
            dispatch(line, decoder: decoder)
        }
        state.withLock { $0.close(.peerClosed(detail: failure)) }
        descriptorOpen.withLock { open in
            open = false
            UnixSocket.closeDescriptor(fd)
        }
    }

    private func dispatch(_ line: Data, decoder: JSONDecoder) {
        // Blank lines and anything else that is not a QMP message are skipped, not fatal.
        guard let message = try? decoder.decode(IncomingMessage.self, from: line) else { return }
        state.withLock { state in
            switch message {
            case .greeting(let greeting):
                state.resolve(SharedState.greetingKey, .success(.greeting(greeting)))
            case .event(let event):
                state.deliver(event)
            case .reply(let id?, let error):
                state.deliverReply(id: id, line: line, error: error)
            case .reply(nil, _):
                break  // nothing to route it to; the caller's timeout will report it
            }
        }
    }

    // MARK: Closing

    /// Fails all waiters and wakes the reader thread, which closes the descriptor on its way out.
    ///
    /// `shutdown` rather than `close`: closing a descriptor that another thread is blocked reading
    /// does not reliably wake it on Linux, and its number could be reused while that thread still
    /// holds it.
    func close() {
        state.withLock { $0.close(.clientClosed) }
        descriptorOpen.withLock { open in
            if open {
                _ = shutdown(fd, Int32(SHUT_RDWR))
            }
        }
    }
}

