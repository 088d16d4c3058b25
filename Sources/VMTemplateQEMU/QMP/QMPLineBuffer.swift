import Foundation

// MARK: - Line splitting

/// Splits the byte stream into lines. QMP ends each JSON object with "\r\n" (QEMU) or "\n", but a
/// read may stop anywhere: mid-line, or after several lines.
struct LineBuffer {
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

    /// Bytes received that are not a complete line yet.
    var pendingCount: Int { bytes.count - start }

    /// Whatever followed the last newline when the stream ended.
    mutating func remainder() -> Data? {
        guard start < bytes.count else { return nil }
        let line = Data(bytes[start...])
        start = bytes.count
        scanned = start
        return line
    }
}

