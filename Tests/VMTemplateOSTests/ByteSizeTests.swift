import Foundation
import Testing

@testable import VMTemplateOS

@Suite("ByteSize")
struct ByteSizeTests {
    @Test(
        "parses whole numbers with optional binary units",
        arguments: [
            ("268435456", 268_435_456),
            ("256M", 268_435_456),
            ("256MiB", 268_435_456),
            ("256m", 268_435_456),
            ("256MB", 268_435_456),
            ("256 MiB", 268_435_456),
            (" 1G ", 1_073_741_824),
            ("1g", 1_073_741_824),
            ("64K", 65_536),
            ("64kib", 65_536),
            ("2T", 2_199_023_255_552),
            ("512B", 512),
            ("1", 1),
        ] as [(String, UInt64)]
    )
    func parsesValidSizes(text: String, bytes: UInt64) throws {
        #expect(try ByteSize(parsing: text).bytes == bytes)
    }

    @Test(
        "rejects malformed sizes with a message naming the text and giving examples",
        arguments: ["12Q", "M", "abc", "-1", "+5M", "1 2M", "256MX", "1e9", "٣M"]
    )
    func rejectsMalformed(text: String) {
        let error = #expect(throws: VMTemplateError.self) { try ByteSize(parsing: text) }
        #expect(error?.code == .invalidArgument)
        #expect(error?.message.contains("'\(text)'") == true)
        #expect(error?.message.contains("e.g. 256M, 1G") == true)
    }

    @Test("the message for an unknown unit reads as documented")
    func unknownUnitMessage() {
        let error = #expect(throws: VMTemplateError.self) { try ByteSize(parsing: "12Q") }
        #expect(error?.message == "invalid size '12Q': use a whole number with an optional unit K, M, G or T (e.g. 256M, 1G)")
    }

    @Test("rejects fractions instead of rounding them", arguments: ["1.5G", "0.5M", "1,5G", "2.G"])
    func rejectsFractions(text: String) {
        let error = #expect(throws: VMTemplateError.self) { try ByteSize(parsing: text) }
        #expect(error?.code == .invalidArgument)
        #expect(error?.message.contains("fractions are not accepted") == true)
    }

    @Test("rejects zero and empty as not greater than zero", arguments: ["0", "0M", "", "   ", "000K"])
    func rejectsZero(text: String) {
        let error = #expect(throws: VMTemplateError.self) { try ByteSize(parsing: text) }
        #expect(error?.code == .invalidArgument)
        #expect(error?.message.contains("size must be greater than zero") == true)
    }

    @Test("rejects sizes that overflow 64 bits", arguments: ["16777216T", "18446744073709551616", "99999999999999999999999G"])
    func rejectsOverflow(text: String) {
        let error = #expect(throws: VMTemplateError.self) { try ByteSize(parsing: text) }
        #expect(error?.code == .invalidArgument)
        #expect(error?.message.contains("too large") == true)
    }

    @Test("accepts the largest size that fits")
    func largestFits() throws {
        #expect(try ByteSize(parsing: "16777215T").bytes == 16_777_215 << 40)
        #expect(try ByteSize(parsing: "18446744073709551615").bytes == UInt64.max)
    }

    @Test(
        "describes sizes in the human form",
        arguments: [
            (268_435_456, "256 MiB"),
            (1_610_612_736, "1.5 GiB"),
            (921_600, "900 KiB"),
            (12, "12 B"),
            (0, "0 B"),
            (1024, "1 KiB"),
            (1_073_741_824, "1 GiB"),
            (2_199_023_255_552, "2 TiB"),
            (1_048_575, "1.0 MiB"),
            (1_153_433_600, "1.1 GiB"),
            (UInt64.max, "16.0 EiB"),
        ] as [(UInt64, String)]
    )
    func describes(bytes: UInt64, text: String) {
        #expect(ByteSize(bytes: bytes).description == text)
    }

    @Test("whole descriptions parse back to the same size")
    func descriptionRoundTrips() throws {
        for size in [ByteSize.mebibytes(256), .gibibytes(2), .kibibytes(900), ByteSize(bytes: 12)] {
            #expect(try ByteSize(parsing: size.description) == size)
        }
    }

    @Test("unit constructors multiply by powers of 1024")
    func constructors() {
        #expect(ByteSize.kibibytes(1).bytes == 1024)
        #expect(ByteSize.mebibytes(256).bytes == 268_435_456)
        #expect(ByteSize.gibibytes(1).bytes == 1_073_741_824)
    }

    @Test("orders by byte count")
    func ordering() {
        #expect(ByteSize.mebibytes(512) < ByteSize.gibibytes(1))
        #expect([ByteSize.gibibytes(1), .kibibytes(1), .mebibytes(1)].sorted() == [.kibibytes(1), .mebibytes(1), .gibibytes(1)])
    }

    @Test("encodes as a plain number and decodes numbers or size strings")
    func codable() throws {
        let encoded = try JSONEncoder().encode([ByteSize.mebibytes(256)])
        #expect(String(decoding: encoded, as: UTF8.self) == "[268435456]")
        let decoded = try JSONDecoder().decode([ByteSize].self, from: Data(#"[268435456, "1G"]"#.utf8))
        #expect(decoded == [.mebibytes(256), .gibibytes(1)])
        #expect(throws: VMTemplateError.self) {
            try JSONDecoder().decode([ByteSize].self, from: Data(#"["1.5G"]"#.utf8))
        }
    }
}
