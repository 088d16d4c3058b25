/// An amount of memory or disk, in bytes, with binary (1024-based) units.
///
/// Parsed from what people type on the command line (`256M`, `1G`, `268435456`) and shown the way
/// people read it (`256 MiB`, `1.5 GiB`).
package struct ByteSize: Sendable, Hashable, Comparable, CustomStringConvertible {
    /// The exact number of bytes.
    public let bytes: UInt64

    /// A size of exactly `bytes` bytes; zero is allowed here because measurements can be zero.
    public init(bytes: UInt64) {
        self.bytes = bytes
    }

    /// `count` KiB; traps on overflow because the callers pass constants.
    public static func kibibytes(_ count: UInt64) -> ByteSize {
        ByteSize(bytes: count * 1024)
    }

    /// `count` MiB; traps on overflow because the callers pass constants.
    public static func mebibytes(_ count: UInt64) -> ByteSize {
        ByteSize(bytes: count * 1024 * 1024)
    }

    /// `count` GiB; traps on overflow because the callers pass constants.
    public static func gibibytes(_ count: UInt64) -> ByteSize {
        ByteSize(bytes: count * 1024 * 1024 * 1024)
    }

    /// Parses a whole, positive size such as `268435456`, `512B`, `64K`, `256M`, `256MiB`, `1G` or `2T`.
    ///
    /// Units are case-insensitive and always binary (`K`, `KB` and `KiB` all mean 1024), matching
    /// QEMU's `-m 256M`. Fractions are rejected rather than rounded so a size never silently changes.
    public init(parsing text: String) throws {
        let trimmed = text.byteSizeTrimmed()
        let examples = "use a whole number with an optional unit K, M, G or T (e.g. 256M, 1G)"
        guard !trimmed.isEmpty else {
            throw VMTemplateError(.invalidArgument, "invalid size '\(text)': size must be greater than zero; \(examples)")
        }

        let digits = trimmed.prefix(while: { $0.isASCII && $0.isNumber })
        let unitText = trimmed.dropFirst(digits.count).byteSizeTrimmed()

        if unitText.first == "." || unitText.first == "," {
            throw VMTemplateError(
                .invalidArgument,
                "invalid size '\(text)': fractions are not accepted; use a whole number with a smaller unit (e.g. 1536M instead of 1.5G)"
            )
        }
        guard !digits.isEmpty, let unit = ByteSize.multiplier(forUnit: unitText) else {
            throw VMTemplateError(.invalidArgument, "invalid size '\(text)': \(examples)")
        }
        guard let number = UInt64(digits) else {
            throw VMTemplateError(.invalidArgument, "invalid size '\(text)': it is too large; \(examples)")
        }
        guard number > 0 else {
            throw VMTemplateError(.invalidArgument, "invalid size '\(text)': size must be greater than zero; \(examples)")
        }
        let (product, overflow) = number.multipliedReportingOverflow(by: unit)
        guard !overflow else {
            throw VMTemplateError(.invalidArgument, "invalid size '\(text)': it is too large; \(examples)")
        }
        self.bytes = product
    }

    /// The human form: `256 MiB`, `1.5 GiB`, `900 KiB`, `12 B`.
    public var description: String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
        var index = 0
        var unit: UInt64 = 1
        while index + 1 < units.count, bytes >= unit * 1024 {
            unit *= 1024
            index += 1
        }
        if bytes % unit == 0 {
            return "\(bytes / unit) \(units[index])"
        }
        // Integer arithmetic in tenths: exact, and `remainder * 10` cannot overflow since unit <= 2^60.
        let whole = bytes / unit
        let tenths = ((bytes % unit) * 10 + unit / 2) / unit
        var shownWhole = whole + tenths / 10
        var shownTenth = tenths % 10
        // 1023.96 KiB rounds to 1024.0 KiB; say 1.0 MiB instead.
        if shownWhole == 1024, index + 1 < units.count {
            index += 1
            shownWhole = 1
            shownTenth = 0
        }
        return "\(shownWhole).\(shownTenth) \(units[index])"
    }

    /// Orders by byte count.
    public static func < (lhs: ByteSize, rhs: ByteSize) -> Bool {
        lhs.bytes < rhs.bytes
    }

    private static func multiplier(forUnit unit: Substring) -> UInt64? {
        switch unit.lowercased() {
        case "", "b": return 1
        case "k", "kb", "kib": return 1 << 10
        case "m", "mb", "mib": return 1 << 20
        case "g", "gb", "gib": return 1 << 30
        case "t", "tb", "tib": return 1 << 40
        default: return nil
        }
    }
}

extension ByteSize: Codable {
    /// Encodes as a plain number of bytes so state files stay exact and easy to read by other tools.
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(bytes)
    }

    /// Decodes a number of bytes, or a string such as "256M" so hand-written config files work too.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if let number = try? container.decode(UInt64.self) {
            self.init(bytes: number)
        } else {
            let text = try container.decode(String.self)
            try self.init(parsing: text)
        }
    }
}

extension StringProtocol where SubSequence == Substring {
    fileprivate func byteSizeTrimmed() -> Substring {
        let start = firstIndex(where: { !$0.isWhitespace }) ?? endIndex
        let end = lastIndex(where: { !$0.isWhitespace }).map { index(after: $0) } ?? start
        return self[start..<Swift.max(start, end)]
    }
}
