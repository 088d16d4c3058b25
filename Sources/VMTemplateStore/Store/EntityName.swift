import VMTemplateOS
import VMTemplateQEMU
/// A template or clone name: one path component of `[A-Za-z0-9._-]`, not starting with `.` or `-`, at most
/// 64 bytes. Checked before anything touches the disk, so a name can never escape the store.
public struct EntityName: Sendable, Hashable, Codable, CustomStringConvertible, Comparable {
    public let value: String
    public static let maxLength = 64

    public init(_ value: String, kind: String = "template") throws {
        guard !value.isEmpty else {
            throw VMTemplateError(.invalidArgument, "\(kind) name is empty: use letters, digits, '.', '_' or '-' (e.g. busybox).")
        }
        guard value.utf8.count <= Self.maxLength else {
            throw VMTemplateError(.invalidArgument, "\(kind) name '\(TerminalText.escape(String(value.prefix(80))))…' is longer than \(Self.maxLength) characters: pick a shorter one.")
        }
        guard value.first != ".", value.first != "-" else {
            throw VMTemplateError(.invalidArgument, "\(kind) name '\(TerminalText.escape(value))' starts with '\(value.first ?? ".")': start it with a letter or digit (a leading '-' reads as an option).")
        }
        let allowed = value.utf8.allSatisfy { byte in
            (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5a) || (byte >= 0x61 && byte <= 0x7a)
                || byte == 0x2e || byte == 0x5f || byte == 0x2d
        }
        guard allowed else {
            throw VMTemplateError(.invalidArgument, "\(kind) name '\(TerminalText.escape(value))' has characters other than letters, digits, '.', '_' and '-': it must be a single path component (e.g. busybox-1.36).")
        }
        self.value = value
    }

    public var description: String { value }

    public static func < (lhs: EntityName, rhs: EntityName) -> Bool { lhs.value < rhs.value }

    public init(from decoder: any Decoder) throws {
        try self.init(try decoder.singleValueContainer().decode(String.self))
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(value)
    }
}
