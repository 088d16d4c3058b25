#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Foundation
import Synchronization

/// A client for the QEMU Machine Protocol (QMP) on a Unix socket.
///
/// QMP is one JSON object per line. QEMU greets first; the client answers `qmp_capabilities`;
/// after that every `{"execute": ..., "arguments": ..., "id": N}` is answered by
/// `{"return": ..., "id": N}` or `{"error": {...}, "id": N}`, and `{"event": ...}` messages may
/// arrive at any moment, including between a command and its reply.
///
/// A dedicated reader thread does blocking reads and routes each line as it arrives: a reply to
/// the call waiting for its id (so calls from several tasks may overlap), an event into a buffer.
/// The buffer is filled whether or not anybody is waiting, so an event that arrives before its
/// ``waitForEvent(_:timeout:matching:)`` — typically while the command that caused it is still
/// waiting for its reply — is not lost.
public final class QMPClient: Sendable {
    /// The socket this client is connected to (for messages).
    public let socketPath: String
    /// What QEMU said when the connection opened.
    public let greeting: QMPGreeting

    private let connection: Connection

    private init(socketPath: String, greeting: QMPGreeting, connection: Connection) {
        self.socketPath = socketPath
        self.greeting = greeting
        self.connection = connection
    }

    deinit {
        connection.close()
    }

    /// Connects to QEMU's QMP socket and negotiates capabilities.
    ///
    /// QEMU creates the socket some time after it starts, so this retries the connection every
    /// millisecond until `timeout` has passed. `isPeerAlive` is asked between attempts: once QEMU
    /// has died the socket will never appear, and waiting out the timeout would only hide the real
    /// failure.
    ///
    /// `pipelining` commands are sent in the same write as `qmp_capabilities`, before the greeting
    /// has even arrived, and `connect` returns once all of them are answered (throwing the first
    /// error). QEMU reads them as soon as the connection opens but runs them in order, and only
    /// once its main loop starts, after it has built the machine (its greeting comes earlier,
    /// from the monitor's own thread): so a restore that depends on nothing but the connection
    /// costs no round trip of its own.
    public static func connect(
        socketPath: String,
        timeout: Duration,
        isPeerAlive: @escaping @Sendable () -> Bool = { true },
        pipelining commands: [QMPCommand] = []
    ) async throws -> QMPClient {
        let clock = ContinuousClock()
        let deadline = clock.now.advanced(by: timeout)
        let fd = try await UnixSocket.connectPolling(
            path: socketPath, deadline: deadline, timeout: timeout, isPeerAlive: isPeerAlive)

        let connection = Connection(fd: fd, socketPath: socketPath)
        connection.startReader()
        do {
            // QEMU accepts no other command until the client leaves capabilities negotiation.
            let sent = try connection.sendAll([QMPCommand("qmp_capabilities")] + commands)
            let greeting = try await connection.greeting(timeout: deadline - clock.now)
            let client = QMPClient(socketPath: socketPath, greeting: greeting, connection: connection)
            for (id, command) in sent {
                _ = try await connection.reply(to: id, command: command, timeout: deadline - clock.now)
            }
            return client
        } catch let error as VMTemplateError where error.code == .timeout {
            connection.close()
            throw VMTemplateError(
                .timeout,
                "Timed out after \(timeout.qmpText) connecting to the QMP socket \(socketPath): "
                    + "QEMU accepted the connection but did not complete the QMP handshake.",
                cause: error.message)
        } catch {
            connection.close()
            throw error
        }
    }

    // MARK: Generic core

    /// Sends `command` and decodes the `return` member of its reply as `Result`.
    ///
    /// Throws ``QMPError`` if QEMU rejects the command, a `.timeout` `VMTemplateError` if no reply
    /// arrives within `timeout`, and a `.qemuFailed` one if the connection closes first.
    public func execute<Result: Decodable & Sendable>(
        _ command: String,
        arguments: (some Encodable & Sendable)? = QMPNoArguments?.none,
        as resultType: Result.Type,
        timeout: Duration = .seconds(10)
    ) async throws -> Result {
        let reply = try await roundTrip(command, arguments: arguments, timeout: timeout)
        do {
            return try JSONDecoder().decode(ReturnEnvelope<Result>.self, from: reply).value
        } catch {
            throw VMTemplateError(
                .qemuFailed,
                "QEMU's reply to the QMP command '\(command)' does not have the expected shape.",
                cause: "\(error)")
        }
    }

    /// Sends a bound command and waits for its reply, ignoring the returned value.
    public func execute(_ command: QMPCommand, timeout: Duration = .seconds(10)) async throws {
        let sent = try connection.sendAll([command])
        _ = try await connection.reply(to: sent[0].id, command: command.name, timeout: timeout)
    }

    /// Sends `command` and waits for its reply, ignoring the returned value.
    public func execute(
        _ command: String,
        arguments: (some Encodable & Sendable)? = QMPNoArguments?.none,
        timeout: Duration = .seconds(10)
    ) async throws {
        _ = try await roundTrip(command, arguments: arguments, timeout: timeout)
    }

    /// The one request/response path underneath every command: returns the raw reply line.
    ///
    /// - Parameter closeMeansSuccess: Treat the connection closing before the reply as success
    ///   (for `quit`, where QEMU may exit before its reply is read).
    private func roundTrip(
        _ command: String,
        arguments: (some Encodable & Sendable)?,
        timeout: Duration,
        closeMeansSuccess: Bool = false
    ) async throws -> Data {
        let sent = try connection.sendAll([QMPCommand(command, arguments: arguments, closeMeansSuccess: closeMeansSuccess)])
        return try await connection.reply(to: sent[0].id, command: command, timeout: timeout)
    }

    // MARK: Events

    /// Returns the first event called `name` that satisfies `predicate` and was not returned by an
    /// earlier call, waiting up to `timeout` for it if none has arrived yet.
    ///
    /// Events that arrived before this call count: they stay buffered until somebody takes them.
    /// `predicate` runs on the reader thread while the client's lock is held, so it must be quick
    /// and must not call back into this client.
    public func waitForEvent(
        _ name: String,
        timeout: Duration,
        matching predicate: @escaping @Sendable (QMPEvent) -> Bool = { _ in true }
    ) async throws -> QMPEvent {
        try await connection.event(named: name, matching: predicate, timeout: timeout)
    }

    /// Every event received since the connection opened, oldest first, whether or not it was
    /// consumed by ``waitForEvent(_:timeout:matching:)``.
    public var receivedEvents: [QMPEvent] {
        connection.receivedEvents
    }

    /// Closes the connection. Calls still waiting fail with an `.ioError`; later calls fail at once.
    /// Calling it again does nothing.
    public func close() {
        connection.close()
    }
}

// MARK: - Commands

extension QMPClient {
    /// Pauses the guest's vCPUs.
    ///
    /// Maps to the QMP command `stop`.
    public func stop() async throws {
        try await execute("stop")
    }

    /// Resumes the guest's vCPUs (also starts a guest created with `-S`).
    ///
    /// Maps to the QMP command `cont`.
    public func cont() async throws {
        try await execute("cont")
    }

    /// Asks QEMU to exit.
    ///
    /// Maps to the QMP command `quit`. QEMU may close the socket right after replying, or before
    /// the reply has been read; since the close is what was asked for, it counts as success.
    public func quit() async throws {
        _ = try await roundTrip(
            "quit", arguments: QMPNoArguments?.none, timeout: .seconds(10), closeMeansSuccess: true)
    }

    /// Returns the VM's run state.
    ///
    /// Maps to the QMP command `query-status`.
    public func queryStatus() async throws -> QMPStatus {
        try await execute("query-status", as: QMPStatus.self)
    }

    /// Turns migration capabilities on or off, e.g. `["x-ignore-shared": true, "events": true]`.
    ///
    /// Maps to the QMP command `migrate-set-capabilities`. Capabilities are sent in name order so
    /// the request is the same on every run.
    public func migrateSetCapabilities(_ capabilities: [String: Bool]) async throws {
        try await execute(.migrateSetCapabilities(capabilities))
    }

    /// Starts an outgoing migration to `uri` (e.g. "file:/path/state" or "unix:/path/sock").
    /// Returns once the migration has started; see ``waitForMigration(timeout:)``.
    ///
    /// Maps to the QMP command `migrate`.
    public func migrate(uri: String) async throws {
        try await execute("migrate", arguments: MigrationURI(uri: uri))
    }

    /// Starts an incoming migration from `uri` on a QEMU started with `-incoming defer`.
    ///
    /// Maps to the QMP command `migrate-incoming`.
    public func migrateIncoming(uri: String) async throws {
        try await execute(.migrateIncoming(uri: uri))
    }

    /// Returns the state of the current or last migration.
    ///
    /// Maps to the QMP command `query-migrate`.
    public func queryMigrate() async throws -> QMPMigrationInfo {
        try await execute("query-migrate", as: QMPMigrationInfo.self)
    }

    /// Returns the GUID of the VM generation ID device (`-device vmgenid`).
    ///
    /// Maps to the QMP command `query-vm-generation-id`.
    public func queryVMGenerationID() async throws -> String {
        try await execute("query-vm-generation-id", as: GUID.self).guid
    }

    /// Waits until the current migration (outgoing or incoming) is `completed`, and returns its
    /// final `query-migrate` state. Throws `.qemuFailed` with QEMU's `error-desc` if it ends
    /// `failed` or `cancelled`, and `.timeout` if it has not ended within `timeout`.
    ///
    /// Relies on `MIGRATION` events, so the caller must have enabled the `events` migration
    /// capability. `query-migrate` is asked once at the start (the migration may already have
    /// ended, and its event been consumed elsewhere) and again whenever an event reports a final
    /// state, both to fetch `error-desc` and because QEMU's own answer is authoritative; a stale
    /// event from an earlier migration therefore cannot end the wait early.
    ///
    /// `startedHere`: the migration was started on this connection after the `events` capability
    /// was on, so its final `MIGRATION` event cannot have gone to anybody else (events are
    /// buffered from the moment the connection opened). The first `query-migrate` is then skipped,
    /// which saves a round trip on a clone's critical path.
    public func waitForMigration(timeout: Duration, startedHere: Bool = false) async throws -> QMPMigrationInfo {
        let clock = ContinuousClock()
        let deadline = clock.now.advanced(by: timeout)
        var info = startedHere ? QMPMigrationInfo(status: "active") : try await queryMigrate()
        while true {
            switch info.status {
            case "completed":
                return info
            case "failed":
                throw VMTemplateError(
                    .qemuFailed,
                    "Migration failed: \(info.errorDescription ?? "QEMU gave no reason").")
            case "cancelled":
                throw VMTemplateError(
                    .qemuFailed,
                    "Migration was cancelled\(info.errorDescription.map { ": \($0)" } ?? "").")
            default:
                break
            }
            let event: QMPEvent
            do {
                event = try await waitForEvent("MIGRATION", timeout: deadline - clock.now) { event in
                    let status = event.data?["status"]?.stringValue
                    return status == "completed" || status == "failed" || status == "cancelled"
                }
            } catch let error as VMTemplateError where error.code == .timeout {
                let lastStatus =
                    receivedEvents.last { $0.name == "MIGRATION" }?.data?["status"]?.stringValue
                    ?? info.status ?? "none"
                throw VMTemplateError(
                    .timeout,
                    "Migration did not finish within \(timeout.qmpText) (last status: \(lastStatus)) "
                        + "on \(socketPath).")
            }
            if startedHere, event.data?["status"]?.stringValue == "completed" {
                // QEMU's own word, and nothing more to fetch: no error-desc on success.
                return QMPMigrationInfo(status: "completed")
            }
            info = try await queryMigrate()
        }
    }
}

// MARK: - Wire types

/// A command to send, with its arguments already bound; see
/// ``QMPClient/connect(socketPath:timeout:isPeerAlive:pipelining:)``.
public struct QMPCommand: Sendable {
    public let name: String
    let closeMeansSuccess: Bool
    /// Encodes the request line for a given `id`; the arguments' type is erased here.
    let encode: @Sendable (_ id: Int) throws -> Data

    public init(_ name: String, arguments: (some Encodable & Sendable)? = QMPNoArguments?.none) {
        self.init(name, arguments: arguments, closeMeansSuccess: false)
    }

    init(_ name: String, arguments: (some Encodable & Sendable)?, closeMeansSuccess: Bool) {
        self.name = name
        self.closeMeansSuccess = closeMeansSuccess
        encode = { id in
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            var line = try encoder.encode(Request(execute: name, arguments: arguments, id: id))
            line.append(UInt8(ascii: "\n"))
            return line
        }
    }

    /// `migrate-set-capabilities`, in name order so the request is the same on every run.
    public static func migrateSetCapabilities(_ capabilities: [String: Bool]) -> QMPCommand {
        let list = capabilities.sorted { $0.key < $1.key }
            .map { MigrationCapability(capability: $0.key, state: $0.value) }
        return QMPCommand("migrate-set-capabilities", arguments: MigrationCapabilities(capabilities: list))
    }

    /// `migrate-incoming` from `uri`, on a QEMU started with `-incoming defer`.
    public static func migrateIncoming(uri: String) -> QMPCommand {
        QMPCommand("migrate-incoming", arguments: MigrationURI(uri: uri))
    }
}

/// The absent `arguments` of a command that takes none; it only gives `nil` a type.
@usableFromInline
struct QMPNoArguments: Encodable, Sendable {}

private struct Request<Arguments: Encodable>: Encodable {
    let execute: String
    let arguments: Arguments?  // encodeIfPresent: omitted when nil
    let id: Int
}

private struct ReturnEnvelope<Value: Decodable>: Decodable {
    let value: Value

    enum CodingKeys: String, CodingKey {
        case value = "return"
    }
}

private struct MigrationCapability: Encodable, Sendable {
    let capability: String
    let state: Bool
}

private struct MigrationCapabilities: Encodable, Sendable {
    let capabilities: [MigrationCapability]
}

private struct MigrationURI: Encodable, Sendable {
    let uri: String
}

private struct GUID: Decodable, Sendable {
    let guid: String
}

/// One line from QEMU, classified. Lines that decode as none of these are skipped.
private enum IncomingMessage: Decodable {
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
private enum Delivery: Sendable {
    case greeting(QMPGreeting)
    case reply(Data)
    case event(QMPEvent)
}

/// Somebody waiting for a greeting, a reply, or an event.
///
/// The result may come from the reader thread, a timer, task cancellation or closing; the first
/// one wins and later ones are ignored, so a reply or event is never both handed out and reported
/// as timed out. It may also come before the waiting task has suspended, so it is held until then.
private struct Waiter {
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
private enum CloseReason {
    case peerClosed(detail: String?)
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
private struct SharedState {
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
private final class Connection: Sendable {
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
    func sendAll(_ commands: [QMPCommand]) throws -> [(id: Int, command: String)] {
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
                        cause: "\(error)")
                }
            }
            try send(bytes, command: commands.map(\.name).joined(separator: ", "))
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
                .timeout, "The QMP command '\(command)' got no reply within \(timeout.qmpText) on \(socketPath)."))
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
                .timeout, "The QMP event '\(name)' did not arrive within \(timeout.qmpText) on \(socketPath)."))
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

    // MARK: Writing

    func send(_ line: Data, command: String) throws {
        let failure: Int32? = descriptorOpen.withLock { open in
            guard open else { return EBADF }
            return line.withUnsafeBytes { UnixSocket.sendAll(fd, $0) }
        }
        guard let code = failure else { return }
        if let reason = state.withLock({ $0.closeReason }) {
            throw reason.error(socketPath: socketPath, sending: command)
        }
        if code == EPIPE || code == ECONNRESET {
            throw CloseReason.peerClosed(detail: errnoText(code)).error(socketPath: socketPath, sending: command)
        }
        throw VMTemplateError(
            .ioError, "Could not send the QMP command '\(command)' to \(socketPath).", cause: errnoText(code))
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
        var failure: String?
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
            } else if count == 0 {
                break
            } else if code != EINTR {
                failure = "read: \(errnoText(code))"
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

// MARK: - Line splitting

/// Splits the byte stream into lines. QMP ends each JSON object with "\r\n" (QEMU) or "\n", but a
/// read may stop anywhere: mid-line, or after several lines.
private struct LineBuffer {
    private var bytes: [UInt8] = []
    /// Where the next line starts.
    private var start = 0
    /// Where to resume looking for "\n", so a long line arriving in pieces is scanned once.
    private var scanned = 0

    mutating func append(_ chunk: UnsafeRawBufferPointer) {
        if start > 0 {
            bytes.removeFirst(start)
            scanned -= start
            start = 0
        }
        bytes.append(contentsOf: chunk)
    }

    /// The next complete line without its terminator, or nil if none is complete yet.
    mutating func nextLine() -> Data? {
        guard let newline = bytes[scanned...].firstIndex(of: UInt8(ascii: "\n")) else {
            scanned = bytes.count
            return nil
        }
        var end = newline
        if end > start, bytes[end - 1] == UInt8(ascii: "\r") {
            end -= 1
        }
        let line = Data(bytes[start..<end])
        start = newline + 1
        scanned = start
        return line
    }

    /// Whatever followed the last newline when the stream ended.
    mutating func remainder() -> Data? {
        guard start < bytes.count else { return nil }
        let line = Data(bytes[start...])
        start = bytes.count
        scanned = start
        return line
    }
}

// MARK: - Socket calls

private enum UnixSocket {
    /// Polls `connect` until QEMU's listening socket accepts, the deadline passes, or the peer dies.
    static func connectPolling(
        path: String,
        deadline: ContinuousClock.Instant,
        timeout: Duration,
        isPeerAlive: @Sendable () -> Bool
    ) async throws -> Int32 {
        guard let address = UnixSocketAddress(path: path) else {
            throw VMTemplateError(
                .invalidArgument,
                "The QMP socket path \(path) is empty or longer than a Unix socket path may be "
                    + "(\(UnixSocketAddress.maxPathBytes) bytes).")
        }

        var lastError: Int32 = ENOENT
        while true {
            switch attempt(address) {
            case .success(let fd):
                return fd
            case .failure(let error)
            where [ENOENT, ECONNREFUSED, EAGAIN, EINTR].contains(error.code):
                // Not there yet (ENOENT), a stale socket file from an earlier QEMU (ECONNREFUSED), or
                // the listen backlog is full (EAGAIN): worth another try.
                lastError = error.code
            case .failure(let error):
                throw VMTemplateError(
                    .ioError, "Could not connect to the QMP socket \(path).", cause: errnoText(error.code))
            }
            guard isPeerAlive() else {
                throw VMTemplateError(
                    .qemuFailed, "QEMU exited before its QMP socket \(path) accepted a connection.")
            }
            guard ContinuousClock.now < deadline else {
                throw VMTemplateError(
                    .timeout,
                    "Timed out after \(timeout.qmpText) waiting for the QMP socket \(path) to accept a connection.",
                    cause: "connect: \(errnoText(lastError))")
            }
            try await Task.sleep(for: .milliseconds(1))
        }
    }

    /// A failed system call's errno.
    private struct SystemCallError: Error {
        let code: Int32
    }

    /// One connection attempt, returning a blocking socket on success.
    private static func attempt(_ address: UnixSocketAddress) -> Result<Int32, SystemCallError> {
        // Non-blocking only for `connect`, which would otherwise wait when the backlog is full.
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { return .failure(SystemCallError(code: errno)) }
        let result = address.withSockaddr { connect(fd, $0, $1) }
        guard result == 0 else {
            let code = errno
            close(fd)
            return .failure(SystemCallError(code: code))
        }
        // The reader thread wants blocking reads. Writes get a send timeout so that a QEMU that
        // stopped reading cannot hang a caller forever.
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
        var sendTimeout = timeval(tv_sec: 10, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &sendTimeout, socklen_t(MemoryLayout<timeval>.size))
        return .success(fd)
    }

    /// Writes all of `bytes`; returns the errno of a failure, or nil.
    static func sendAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Int32? {
        guard let base = bytes.baseAddress else { return nil }
        var offset = 0
        while offset < bytes.count {
            // MSG_NOSIGNAL: a peer that hung up must give EPIPE, not kill the process with SIGPIPE.
            let written = send(fd, base + offset, bytes.count - offset, Int32(MSG_NOSIGNAL))
            if written >= 0 {
                offset += written
            } else {
                let code = errno
                if code != EINTR { return code }
            }
        }
        return nil
    }

    static func closeDescriptor(_ fd: Int32) {
        _ = close(fd)
    }
}

// MARK: - Formatting

extension Duration {
    /// "250 ms", "5 s", "1.5 s" — for messages.
    fileprivate var qmpText: String {
        let (seconds, attoseconds) = components
        let milliseconds = seconds * 1000 + attoseconds / 1_000_000_000_000_000
        if milliseconds < 1000 { return "\(milliseconds) ms" }
        if milliseconds % 1000 == 0 { return "\(milliseconds / 1000) s" }
        return "\(Double(milliseconds) / 1000) s"
    }
}
