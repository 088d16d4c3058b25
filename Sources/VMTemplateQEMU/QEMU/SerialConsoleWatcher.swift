import VMTemplateOS
import Foundation

/// Follows a guest's serial log (a file QEMU appends to) until a marker appears.
///
/// The file is read incrementally every few milliseconds: cheap, and tight enough that a template's
/// boot is not padded by a coarse sleep. Also used by the cold-boot benchmark.
package struct SerialConsoleWatcher: Sendable {
    package let path: String
    /// How often the log is read: tight enough that a boot is not padded by a coarse sleep.
    package var pollInterval: Duration

    package init(path: String, pollInterval: Duration = .milliseconds(5)) {
        self.path = path
        self.pollInterval = pollInterval
    }

    /// Returns true once `marker` has appeared, false if `isAlive` turns false first; throws a
    /// `.timeout` error when the deadline passes, and what `problem` returns (asked every ~100 ms)
    /// as soon as it returns one: a wait that can no longer succeed (the disk the log and the RAM
    /// are written to is full) stops at once, not at the deadline.
    package func waitForMarker(_ marker: String, timeout: Duration, isAlive: () -> Bool, problem: () -> VMTemplateError? = { nil }) async throws -> Bool {
        var polls = 0
        let deadline = ContinuousClock.now + timeout
        let needle = Array(marker.utf8)
        var offset: UInt64 = 0
        var tail: [UInt8] = []
        while true {
            if let handle = FileHandle(forReadingAtPath: path) {
                defer { try? handle.close() }
                try? handle.seek(toOffset: offset)
                if let data = try? handle.readToEnd(), !data.isEmpty {
                    offset += UInt64(data.count)
                    // Keep the last marker-length bytes so a marker split across reads is found.
                    tail += data
                    if Self.contains(tail, needle) { return true }
                    if tail.count > needle.count { tail.removeFirst(tail.count - needle.count) }
                }
            }
            if !isAlive() { return false }
            polls += 1
            if polls % 20 == 0, let problem = problem() { throw problem }
            if ContinuousClock.now >= deadline {
                throw VMTemplateError(.timeout, "")
            }
            try await Task.sleep(for: pollInterval)
        }
    }

    private static func contains(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool {
        guard !needle.isEmpty, haystack.count >= needle.count else { return needle.isEmpty }
        for start in 0...(haystack.count - needle.count) where haystack[start] == needle[0] {
            if Array(haystack[start..<(start + needle.count)]) == needle { return true }
        }
        return false
    }
}
