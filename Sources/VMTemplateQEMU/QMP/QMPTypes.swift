import VMTemplateOS
import Foundation

// Value types exchanged with QEMU over QMP. The wire format is described in QEMU's
// docs/interop/qmp-spec.rst; the command and event schemas in qapi/*.json.

// MARK: - JSONValue

/// An arbitrary JSON value, for the parts of QMP whose shape depends on the command or event
/// (event `data`, recorded arguments in tests).
///
/// Numbers are held as `Double`, which is exact for integers up to 2^53; that covers every value
/// this project reads from QMP events.
public enum JSONValue: Codable, Sendable, Equatable, Hashable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    /// The member `key` of an object, or nil if this is not an object or has no such member.
    public subscript(key: String) -> JSONValue? {
        guard case .object(let members) = self else { return nil }
        return members[key]
    }

    /// The element at `index` of an array, or nil if this is not an array or the index is out of range.
    public subscript(index: Int) -> JSONValue? {
        guard case .array(let elements) = self, elements.indices.contains(index) else { return nil }
        return elements[index]
    }

    public var stringValue: String? {
        guard case .string(let value) = self else { return nil }
        return value
    }

    public var boolValue: Bool? {
        guard case .bool(let value) = self else { return nil }
        return value
    }

    public var numberValue: Double? {
        guard case .number(let value) = self else { return nil }
        return value
    }

    /// The number as an `Int`, if it is integral and in range.
    public var intValue: Int? {
        guard case .number(let value) = self else { return nil }
        return Int(exactly: value)
    }

    public var arrayValue: [JSONValue]? {
        guard case .array(let value) = self else { return nil }
        return value
    }

    public var objectValue: [String: JSONValue]? {
        guard case .object(let value) = self else { return nil }
        return value
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        // Bool before number: a number decoder could otherwise claim `true`/`false` on some
        // Foundation implementations.
        if container.decodeNil() {
            self = .null
        } else if let value = try? container.decode(Bool.self) {
            self = .bool(value)
        } else if let value = try? container.decode(Double.self) {
            self = .number(value)
        } else if let value = try? container.decode(String.self) {
            self = .string(value)
        } else if let value = try? container.decode([JSONValue].self) {
            self = .array(value)
        } else {
            self = .object(try container.decode([String: JSONValue].self))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .null: try container.encodeNil()
        case .bool(let value): try container.encode(value)
        case .number(let value): try container.encode(value)
        case .string(let value): try container.encode(value)
        case .array(let value): try container.encode(value)
        case .object(let value): try container.encode(value)
        }
    }
}

extension JSONValue: ExpressibleByNilLiteral, ExpressibleByBooleanLiteral, ExpressibleByIntegerLiteral,
    ExpressibleByFloatLiteral, ExpressibleByStringLiteral, ExpressibleByArrayLiteral,
    ExpressibleByDictionaryLiteral
{
    public init(nilLiteral: ()) { self = .null }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(integerLiteral value: Int) { self = .number(Double(value)) }
    public init(floatLiteral value: Double) { self = .number(value) }
    public init(stringLiteral value: String) { self = .string(value) }
    public init(arrayLiteral elements: JSONValue...) { self = .array(elements) }
    public init(dictionaryLiteral elements: (String, JSONValue)...) {
        self = .object(Dictionary(elements, uniquingKeysWith: { _, last in last }))
    }
}

// MARK: - Greeting

/// The greeting QEMU sends as soon as a client connects:
/// `{"QMP": {"version": {"qemu": {"major", "minor", "micro"}, "package"}, "capabilities": [...]}}`.
public struct QMPGreeting: Sendable, Equatable, Decodable {
    public let qemuVersion: QEMUVersion
    /// The distribution's package string, e.g. "Debian 1:10.0.2+ds-2"; may be empty.
    public let package: String
    /// Optional protocol capabilities QEMU offers (e.g. "oob"). This client enables none of them.
    public let capabilities: [String]

    public init(qemuVersion: QEMUVersion, package: String, capabilities: [String]) {
        self.qemuVersion = qemuVersion
        self.package = package
        self.capabilities = capabilities
    }

    private enum CodingKeys: String, CodingKey { case version, capabilities }
    private enum VersionKeys: String, CodingKey { case qemu, package }

    /// Decodes the object under the greeting's `"QMP"` key.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let version = try container.nestedContainer(keyedBy: VersionKeys.self, forKey: .version)
        qemuVersion = try version.decode(QEMUVersion.self, forKey: .qemu)
        package = try version.decodeIfPresent(String.self, forKey: .package) ?? ""
        // Capabilities are strings today; stay lenient so a schema change cannot break connecting.
        let offered = (try? container.decodeIfPresent([JSONValue].self, forKey: .capabilities)) ?? nil
        capabilities = (offered ?? []).compactMap(\.stringValue)
    }
}

// MARK: - Events

/// An asynchronous QMP event: `{"event": NAME, "data": {...}, "timestamp": {"seconds", "microseconds"}}`.
public struct QMPEvent: Sendable, Equatable, Codable {
    /// When QEMU emitted the event (host wall clock).
    public struct Timestamp: Sendable, Equatable, Codable {
        public let seconds: Int
        public let microseconds: Int

        public init(seconds: Int, microseconds: Int) {
            self.seconds = seconds
            self.microseconds = microseconds
        }

        public var date: Date {
            Date(timeIntervalSince1970: Double(seconds) + Double(microseconds) / 1_000_000)
        }
    }

    public let name: String
    public let data: JSONValue?
    public let timestamp: Timestamp

    public init(name: String, data: JSONValue? = nil, timestamp: Timestamp) {
        self.name = name
        self.data = data
        self.timestamp = timestamp
    }

    private enum CodingKeys: String, CodingKey {
        case name = "event"
        case data
        case timestamp
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        name = try container.decode(String.self, forKey: .name)
        data = try container.decodeIfPresent(JSONValue.self, forKey: .data)
        // QEMU always sends a timestamp; an absent one should not make the event vanish.
        timestamp =
            try container.decodeIfPresent(Timestamp.self, forKey: .timestamp)
            ?? Timestamp(seconds: 0, microseconds: 0)
    }
}

// MARK: - Errors

/// A command QEMU rejected: the reply was `{"error": {"class": ..., "desc": ...}}`.
package struct QMPError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The QMP command that failed, e.g. "migrate".
    public let command: String
    /// QEMU's error class, almost always "GenericError"; others are "CommandNotFound",
    /// "DeviceNotActive", "DeviceNotFound", "KVMMissingCap".
    public let errorClass: String
    /// QEMU's human-readable explanation (the `desc` member).
    public let desc: String

    public init(command: String, errorClass: String, desc: String) {
        self.command = command
        self.errorClass = errorClass
        self.desc = desc
    }

    public var description: String { "QMP command '\(command)' failed: \(errorClass): \(desc)" }
}

// MARK: - Command results

/// The reply to `query-status`.
public struct QMPStatus: Sendable, Equatable, Decodable {
    /// The run state, e.g. "prelaunch", "paused", "running", "inmigrate", "postmigrate", "shutdown".
    public let status: String
    /// Whether the guest's vCPUs are executing.
    public let running: Bool

    public init(status: String, running: Bool) {
        self.status = status
        self.running = running
    }
}

/// The reply to `query-migrate` (only the members this project uses).
public struct QMPMigrationInfo: Sendable, Equatable, Decodable {
    /// "none", "setup", "active", "device", "completed", "failed", "cancelling", "cancelled", ...;
    /// absent when no migration was ever started.
    public let status: String?
    /// Why the migration failed, when `status` is "failed".
    public let errorDescription: String?

    public init(status: String?, errorDescription: String? = nil) {
        self.status = status
        self.errorDescription = errorDescription
    }

    private enum CodingKeys: String, CodingKey {
        case status
        case errorDescription = "error-desc"
    }
}
