/// Host memory from `/proc/meminfo`, to decide whether another clone fits.
package struct MemInfo: Sendable, Equatable, Codable {
    /// Usable RAM (MemTotal).
    package var totalBytes: UInt64
    /// Memory that can be given to new work without swapping (MemAvailable), counting reclaimable cache.
    package var availableBytes: UInt64

    /// Creates a record; normally obtained from `read()` or `parse(_:)`.
    package init(totalBytes: UInt64, availableBytes: UInt64) {
        self.totalBytes = totalBytes
        self.availableBytes = availableBytes
    }

    /// Parses the text of `/proc/meminfo`, or returns nil if MemTotal is missing.
    ///
    /// Kernels before 3.14 have no MemAvailable; MemFree + Buffers + Cached is the usual stand-in there.
    package static func parse(_ text: String) -> MemInfo? {
        var values: [Substring: UInt64] = [:]
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let parts = line[line.index(after: colon)...].split(separator: " ")
            guard let number = parts.first.flatMap({ UInt64($0) }) else { continue }
            let multiplier: UInt64 = parts.count > 1 && parts[1] == "kB" ? 1024 : 1
            let (bytes, overflow) = number.multipliedReportingOverflow(by: multiplier)
            values[line[..<colon]] = overflow ? UInt64.max : bytes
        }
        guard let total = values["MemTotal"] else { return nil }
        let available = values["MemAvailable"]
            ?? (values["MemFree"] ?? 0) &+ (values["Buffers"] ?? 0) &+ (values["Cached"] ?? 0)
        return MemInfo(totalBytes: total, availableBytes: min(available, total))
    }

    /// Reads `/proc/meminfo`.
    package static func read() throws -> MemInfo {
        switch FileSystem.readText(path: "/proc/meminfo") {
        case .success(let text):
            guard let info = parse(text) else {
                throw VMTemplateError(.ioError, "could not understand '/proc/meminfo': it has no MemTotal line; check that /proc is a real procfs mount")
            }
            return info
        case .failure(let failure):
            throw VMTemplateError(
                .ioError,
                "could not read '/proc/meminfo': \(errnoText(failure.code)); check that /proc is mounted",
                cause: failure
            )
        }
    }
}
