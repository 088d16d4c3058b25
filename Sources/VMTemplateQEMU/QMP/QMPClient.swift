import VMTemplateOS
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

    let connection: Connection

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
        pipelining commands: [QMPCommand] = [],
        passing descriptor: Int32? = nil
    ) async throws -> QMPClient {
        let clock = ContinuousClock()
        let deadline = clock.now.advanced(by: timeout)
        let fd = try await UnixSocket.connectPolling(
            path: socketPath, deadline: deadline, timeout: timeout, isPeerAlive: isPeerAlive)

        let connection = Connection(fd: fd, socketPath: socketPath)
        connection.startReader()
        do {
            // QEMU accepts no other command until the client leaves capabilities negotiation.
            // A descriptor goes with the same write: QEMU keeps it for the pipelined `add-fd`.
            let sent = try connection.sendAll([QMPCommand("qmp_capabilities")] + commands, passing: descriptor)
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
                "Timed out after \(timeout.shortText) connecting to the QMP socket \(socketPath): "
                    + "QEMU accepted the connection but did not complete the QMP handshake.",
                cause: error)
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
                cause: error)
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
    func roundTrip(
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

