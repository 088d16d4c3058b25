import VMTemplateOS

/// An Ethernet address for a clone's NIC.
public struct MACAddress: Sendable, Equatable, Hashable, CustomStringConvertible, Codable {
    public let bytes: [UInt8]

    /// Parses `aa:bb:cc:dd:ee:ff`; refuses multicast and all-zero addresses, which no NIC may have.
    public init(parsing text: String) throws {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        let bytes = parts.compactMap { $0.count == 2 ? UInt8($0, radix: 16) : nil }
        guard parts.count == 6, bytes.count == 6 else {
            throw VMTemplateError(.invalidArgument, "'\(TerminalText.escape(text))' is not a MAC address: write six hex pairs, e.g. mac=02:00:00:00:00:01.")
        }
        guard bytes[0] & 1 == 0, bytes.contains(where: { $0 != 0 }) else {
            throw VMTemplateError(.invalidArgument, "MAC address \(TerminalText.escape(text)) is multicast or zero: a NIC needs a unicast address (first byte even), e.g. 02:00:00:00:00:01.")
        }
        self.bytes = bytes
    }

    private init(bytes: [UInt8]) { self.bytes = bytes }

    /// The address of NIC number `index` of the clone with ID `seed`: locally administered and
    /// unicast (first byte 0x02), four bytes that hash the clone's ID, and the NIC's number, so a
    /// clone's NICs never share an address and clones almost never do (for 128 clones the chance
    /// that any two of them collide is about 2 in a million).
    public static func derived(seed: String, index: Int) -> MACAddress {
        // FNV-1a: stable across runs and builds (Swift's Hasher is seeded per process).
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in seed.utf8 {
            hash ^= UInt64(byte)
            hash = hash &* 0x0000_0100_0000_01b3
        }
        let hashed = (0..<4).map { UInt8(truncatingIfNeeded: hash >> (8 * UInt64($0))) }
        return MACAddress(bytes: [0x02] + hashed + [UInt8(truncatingIfNeeded: index)])
    }

    public var description: String {
        bytes.map { byte in
            let digits = String(byte, radix: 16)
            return digits.count == 1 ? "0" + digits : digits
        }.joined(separator: ":")
    }

    public init(from decoder: any Decoder) throws {
        try self.init(parsing: try decoder.singleValueContainer().decode(String.self))
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}
