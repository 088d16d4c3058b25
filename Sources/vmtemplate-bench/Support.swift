import Foundation
import Synchronization
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A failure of the benchmark itself (not of the library): one line for the user.
struct BenchError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

// MARK: - Statistics

/// Median, minimum and maximum of a set of samples. The median, not the mean: on a noisy machine
/// one preempted run must not move the figure.
struct Summary: Codable, Sendable {
    var runs: Int
    var median: Double
    var min: Double
    var max: Double
    var samples: [Double]

    init(_ samples: [Double]) {
        let sorted = samples.sorted()
        runs = sorted.count
        if sorted.isEmpty {
            median = .nan
        } else if sorted.count % 2 == 1 {
            median = sorted[sorted.count / 2]
        } else {
            median = (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
        }
        min = sorted.first ?? .nan
        max = sorted.last ?? .nan
        self.samples = samples
    }
}

extension Summary {
    /// A table row: name, runs, median, min, max.
    static func tableRow(_ name: String, _ summary: Summary) -> [String] {
        [name, String(summary.runs), Format.milliseconds(summary.median), Format.milliseconds(summary.min), Format.milliseconds(summary.max)]
    }
}

// MARK: - Formatting

enum Format {
    static func milliseconds(_ seconds: Double) -> String {
        guard seconds.isFinite else { return "-" }
        if seconds >= 10 { return String(format: "%.1f s", seconds) }
        if seconds >= 1 { return String(format: "%.2f s", seconds) }
        return String(format: "%.1f ms", seconds * 1000)
    }

    static func mebibytes(_ bytes: Double) -> String {
        guard bytes.isFinite else { return "-" }
        return String(format: "%.1f MiB", bytes / 1_048_576)
    }

    static func ratio(_ value: Double) -> String {
        guard value.isFinite else { return "-" }
        return value >= 10 ? String(format: "%.0f×", value) : String(format: "%.2f×", value)
    }

    /// Left-aligned first column, right-aligned others.
    static func table(_ header: [String], _ rows: [[String]]) -> String {
        let all = [header] + rows
        let widths = header.indices.map { column in all.map { $0.indices.contains(column) ? $0[column].count : 0 }.max() ?? 0 }
        func render(_ row: [String]) -> String {
            row.enumerated().map { index, cell in
                let padding = String(repeating: " ", count: Swift.max(0, widths[index] - cell.count))
                return index == 0 ? cell + padding : padding + cell
            }.joined(separator: "  ")
        }
        return ([render(header), widths.map { String(repeating: "-", count: $0) }.joined(separator: "  ")] + rows.map(render)).joined(separator: "\n")
    }
}

// MARK: - Child processes (the vmtemplate CLI)

/// A child process (the vmtemplate CLI) with its stdout and stderr in files. The library's
/// `ProcessHandle` starts it, in the bench's session (a Ctrl-C reaches it with the bench), with
/// extra environment variables where a run needs them.
final class ChildProcess: Sendable {
    let handle: ProcessHandle
    let stdoutPath: String
    let stderrPath: String
    let started: ContinuousClock.Instant
    var pid: pid_t { handle.pid }

    private init(handle: ProcessHandle, stdoutPath: String, stderrPath: String, started: ContinuousClock.Instant) {
        self.handle = handle
        self.stdoutPath = stdoutPath
        self.stderrPath = stderrPath
        self.started = started
    }

    static func spawn(_ executable: String, _ arguments: [String], environment extra: [String: String] = [:], transparentHugePages: Bool = true, outputBase: String) throws -> ChildProcess {
        var request = SpawnRequest(executable: executable, arguments: arguments, stdoutPath: outputBase + ".out")
        request.stderrPath = outputBase + ".err"
        request.truncateOutput = true
        request.environment = extra
        request.transparentHugePages = transparentHugePages
        let started = ContinuousClock.now
        let handle = try ProcessHandle.spawn(request)
        let child = ChildProcess(handle: handle, stdoutPath: outputBase + ".out", stderrPath: outputBase + ".err", started: started)
        Cleanup.shared.adopt(child: child)
        return child
    }

    /// Waits for the child to exit (on a thread of its own); returns its wait status and when it
    /// was reaped.
    func wait() async throws -> (status: Int32, ended: ContinuousClock.Instant) {
        let handle = self.handle
        let result = try await onOwnThread { () -> (Int32, ContinuousClock.Instant) in
            let status = handle.waitBlocking() ?? 0
            return (status, ContinuousClock.now)
        }
        Cleanup.shared.release(child: self)
        return result
    }

    var stdout: String { (try? String(contentsOfFile: stdoutPath, encoding: .utf8)) ?? "" }
    var stderr: String { (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "" }

    func removeOutput() {
        unlink(stdoutPath)
        unlink(stderrPath)
    }
}

// MARK: - Unix sockets (QMP greeting, guest control channel)

/// A connected Unix stream socket read line by line with deadlines. Blocking calls: use it from
/// `onOwnThread` or where blocking is intended.
final class LineSocket {
    private let fd: Int32
    private var buffer: [UInt8] = []

    private init(fd: Int32) { self.fd = fd }
    deinit { close(fd) }

    /// Retries `connect` every millisecond (what `QMPClient.connect` does) until it succeeds, the
    /// deadline passes, or `isAlive` says the server died. On a QEMU given a pre-bound listener
    /// (`QMPListener`) the first attempt succeeds and the greeting read blocks until QEMU greets.
    static func connect(path: String, deadline: ContinuousClock.Instant, isAlive: () -> Bool = { true }) throws -> LineSocket {
        guard let address = UnixSocketAddress(path: path) else { throw BenchError("socket path too long: \(path)") }
        while true {
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw BenchError("socket: \(String(cString: strerror(errno)))") }
            let result = address.withSockaddr { Glibc.connect(fd, $0, $1) }
            if result == 0 { return LineSocket(fd: fd) }
            let code = errno
            close(fd)
            guard [ENOENT, ECONNREFUSED, EAGAIN, EINTR].contains(code) else {
                throw BenchError("connect \(path): \(String(cString: strerror(code)))")
            }
            guard isAlive() else { throw BenchError("the process serving \(path) exited before it accepted a connection") }
            guard ContinuousClock.now < deadline else { throw BenchError("timed out connecting to \(path)") }
            usleep(1000)
        }
    }

    func writeLine(_ text: String) throws {
        let bytes = Array((text + "\n").utf8)
        var offset = 0
        while offset < bytes.count {
            let written = bytes[offset...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if written < 0 {
                if errno == EINTR { continue }
                throw BenchError("send: \(String(cString: strerror(errno)))")
            }
            offset += written
        }
    }

    /// The next line without its terminator ("\r\n" or "\n").
    func readLine(deadline: ContinuousClock.Instant) throws -> String {
        while true {
            if let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                var line = Array(buffer[..<newline])
                buffer.removeFirst(newline + 1)
                if line.last == UInt8(ascii: "\r") { line.removeLast() }
                return String(decoding: line, as: UTF8.self)
            }
            let remaining = ContinuousClock.now.duration(to: deadline)
            guard remaining > .zero else { throw BenchError("timed out waiting for a line") }
            var pollDescriptor = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let milliseconds = Int32(clamping: remaining.components.seconds * 1000 + remaining.components.attoseconds / 1_000_000_000_000_000 + 1)
            let ready = poll(&pollDescriptor, 1, milliseconds)
            if ready < 0 {
                if errno == EINTR { continue }
                throw BenchError("poll: \(String(cString: strerror(errno)))")
            }
            if ready == 0 { continue }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let count = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count < 0 {
                if errno == EINTR { continue }
                throw BenchError("recv: \(String(cString: strerror(errno)))")
            }
            if count == 0 { throw BenchError("connection closed before a full line arrived") }
            buffer += chunk[..<count]
        }
    }
}

// MARK: - Transparent huge pages

/// Transparent huge pages: the runs that turn them off for a CLI child (and the QEMU it starts)
/// do so with `SpawnRequest.transparentHugePages`, the library's own switch.
enum TransparentHugePages {
    /// The system-wide mode, e.g. "madvise".
    static var systemMode: String {
        let text = (try? String(contentsOfFile: "/sys/kernel/mm/transparent_hugepage/enabled", encoding: .utf8)) ?? ""
        guard let open = text.firstIndex(of: "["), let close = text.firstIndex(of: "]"), open < close else { return "unknown" }
        return String(text[text.index(after: open)..<close])
    }
}

// MARK: - Host facts

struct HostFacts: Codable, Sendable {
    var date: String
    var cores: Int
    var kernel: String
    var qemu: String
    var transparentHugePages: String
    var loadAverage: String

    enum CodingKeys: String, CodingKey {
        case date, cores, kernel, qemu
        case transparentHugePages = "transparent_hugepages"
        case loadAverage = "load_average"
    }

    static func current(qemuPath: String) -> HostFacts {
        var name = utsname()
        uname(&name)
        let release = withUnsafeBytes(of: &name.release) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        let formatter = ISO8601DateFormatter()
        return HostFacts(
            date: formatter.string(from: Date()),
            cores: sysconf(Int32(_SC_NPROCESSORS_ONLN)),
            kernel: release,
            qemu: qemuVersionLine(qemuPath),
            transparentHugePages: TransparentHugePages.systemMode,
            loadAverage: Self.loadAverage
        )
    }

    static var loadAverage: String {
        let text = (try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8)) ?? ""
        return text.split(separator: " ").prefix(3).joined(separator: " ")
    }

    private static func qemuVersionLine(_ path: String) -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = ["--version"]
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = FileHandle.nullDevice
        do { try process.run() } catch { return "unknown" }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return String(decoding: data, as: UTF8.self).split(separator: "\n").first.map(String.init) ?? "unknown"
    }
}
