import VMTemplateOS
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Foundation
import Synchronization

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

    /// Hands `descriptor` to QEMU in a new (or the given) fd set, for `/dev/fdset/N` paths: QEMU
    /// then uses a file it may not be able to open itself (it may run as another user). This
    /// process keeps its own copy of the descriptor.
    ///
    /// Maps to the QMP command `add-fd`, with the descriptor passed as SCM_RIGHTS.
    public func addFD(_ descriptor: Int32, fdset: Int? = nil, opaque: String? = nil) async throws -> (fdset: Int, fd: Int) {
        let command = QMPCommand("add-fd", arguments: AddFD(fdsetID: fdset, opaque: opaque))
        let sent = try connection.sendAll([command], passing: descriptor)
        let reply = try await connection.reply(to: sent[0].id, command: command.name, timeout: .seconds(10))
        do {
            let info = try JSONDecoder().decode(ReturnEnvelope<AddFDInfo>.self, from: reply).value
            return (info.fdsetID, info.fd)
        } catch {
            throw VMTemplateError(.qemuFailed, "QEMU's reply to 'add-fd' does not have the expected shape.", cause: error)
        }
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
                    "Migration did not finish within \(timeout.shortText) (last status: \(lastStatus)) "
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

    /// `add-fd` for a descriptor sent with the same write (see `connect(..., passing:)`).
    public static func addFD(fdset: Int, opaque: String? = nil) -> QMPCommand {
        QMPCommand("add-fd", arguments: AddFD(fdsetID: fdset, opaque: opaque))
    }

    /// `migrate-incoming` from `uri`, on a QEMU started with `-incoming defer`.
    public static func migrateIncoming(uri: String) -> QMPCommand {
        QMPCommand("migrate-incoming", arguments: MigrationURI(uri: uri))
    }
}

/// The absent `arguments` of a command that takes none; it only gives `nil` a type.
@usableFromInline
struct QMPNoArguments: Encodable, Sendable {}

struct Request<Arguments: Encodable>: Encodable {
    let execute: String
    let arguments: Arguments?  // encodeIfPresent: omitted when nil
    let id: Int
}

struct ReturnEnvelope<Value: Decodable>: Decodable {
    let value: Value

    enum CodingKeys: String, CodingKey {
        case value = "return"
    }
}

struct MigrationCapability: Encodable, Sendable {
    let capability: String
    let state: Bool
}

struct MigrationCapabilities: Encodable, Sendable {
    let capabilities: [MigrationCapability]
}

struct AddFD: Encodable, Sendable {
    let fdsetID: Int?
    let opaque: String?

    enum CodingKeys: String, CodingKey {
        case fdsetID = "fdset-id"
        case opaque
    }
}

struct AddFDInfo: Decodable, Sendable {
    let fdsetID: Int
    let fd: Int

    enum CodingKeys: String, CodingKey {
        case fdsetID = "fdset-id"
        case fd
    }
}

struct MigrationURI: Encodable, Sendable {
    let uri: String
}

struct GUID: Decodable, Sendable {
    let guid: String
}

/// One line from QEMU, classified. Lines that decode as none of these are skipped.
