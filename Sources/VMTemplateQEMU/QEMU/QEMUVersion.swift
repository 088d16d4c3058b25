import Foundation

/// A QEMU release number, as `qemu-system-x86_64 --version` and the QMP greeting print it.
/// The one representation of a version in vmtemplate: the binary's `--version`, the QMP greeting
/// and the manifest all use it. Encoded as the string "10.0.2"; decoded from that string or from
/// the greeting's `{"major", "minor", "micro"}` object.
public struct QEMUVersion: Sendable, Codable, Hashable, Comparable, CustomStringConvertible {
    public var major: Int
    public var minor: Int
    public var micro: Int

    public init(_ major: Int, _ minor: Int, _ micro: Int = 0) {
        self.major = major
        self.minor = minor
        self.micro = micro
    }

    /// Parses `10.0.2` (and tolerates a trailing `-rc1` or Debian suffix after a space).
    public init?(parsing text: String) {
        let core = text.split(whereSeparator: { $0 == " " || $0 == "-" || $0 == "(" }).first ?? ""
        let numbers = core.split(separator: ".").map { Int($0) }
        guard numbers.count >= 2, let major = numbers[0], let minor = numbers[1] else { return nil }
        let micro = numbers.count > 2 ? (numbers[2] ?? 0) : 0
        self.init(major, minor, micro)
    }

    public var description: String { "\(major).\(minor).\(micro)" }

    public static func < (lhs: QEMUVersion, rhs: QEMUVersion) -> Bool {
        (lhs.major, lhs.minor, lhs.micro) < (rhs.major, rhs.minor, rhs.micro)
    }

    /// `memory-backend-file` `rom=`, the permission hint, and `file:` migration URIs.
    public static let romAndFileMigration = QEMUVersion(8, 2)
    /// Machine property `memory-backend=ID`.
    public static let machineMemoryBackend = QEMUVersion(5, 0)
    /// `x-ignore-shared` with a private destination mapping.
    public static let privateIgnoreShared = QEMUVersion(4, 1)

    private enum CodingKeys: String, CodingKey { case major, minor, micro }

    public init(from decoder: any Decoder) throws {
        if let text = try? decoder.singleValueContainer().decode(String.self) {
            guard let version = QEMUVersion(parsing: text) else {
                throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "'\(text)' is not a QEMU version such as 10.0.2"))
            }
            self = version
            return
        }
        let container = try decoder.container(keyedBy: CodingKeys.self)
        self.init(try container.decode(Int.self, forKey: .major), try container.decode(Int.self, forKey: .minor), try container.decodeIfPresent(Int.self, forKey: .micro) ?? 0)
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}
