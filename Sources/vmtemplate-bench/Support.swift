import Foundation
import Synchronization
import VMTemplateKit

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

// MARK: - Blocking work off the cooperative pool

/// Runs blocking code (waitpid, poll on a socket) on a thread of its own. The cooperative pool has
/// one thread per core, two here: sixteen concurrent waits blocking it would serialize the very
/// start-ups being timed.
func onOwnThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        let thread = Thread {
            continuation.resume(with: Result { try body() })
        }
        thread.stackSize = 1 << 20
        thread.start()
    }
}

// MARK: - Child processes (the vmtemplate CLI)

/// A child process started with posix_spawn, its stdout and stderr in files.
///
/// Not `QEMUProcess.spawn`: that one puts the child in a session of its own and always passes the
/// bench's environment, while a CLI child must get Ctrl-C with the bench and may need extra
/// environment variables (the malloc tuning runs).
final class ChildProcess: Sendable {
    let pid: pid_t
    let stdoutPath: String
    let stderrPath: String
    let started: ContinuousClock.Instant

    private init(pid: pid_t, stdoutPath: String, stderrPath: String, started: ContinuousClock.Instant) {
        self.pid = pid
        self.stdoutPath = stdoutPath
        self.stderrPath = stderrPath
        self.started = started
    }

    static func spawn(_ executable: String, _ arguments: [String], environment extra: [String: String] = [:], outputBase: String) throws -> ChildProcess {
        var fileActions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&fileActions)
        defer { posix_spawn_file_actions_destroy(&fileActions) }
        let stdoutPath = outputBase + ".out"
        let stderrPath = outputBase + ".err"
        posix_spawn_file_actions_addopen(&fileActions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&fileActions, 1, stdoutPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_addopen(&fileActions, 2, stderrPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)

        var environment = ProcessInfo.processInfo.environment
        for (key, value) in extra { environment[key] = value }
        let environmentStrings = environment.map { "\($0.key)=\($0.value)" }
        var cEnvironment: [UnsafeMutablePointer<CChar>?] = environmentStrings.map { strdup($0) }
        cEnvironment.append(nil)
        var cArguments: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) }
        cArguments.append(nil)
        defer {
            for pointer in cEnvironment { free(pointer) }
            for pointer in cArguments { free(pointer) }
        }
        // Default dispositions: the bench ignores SIGINT (it handles it itself), and an ignored
        // signal would otherwise stay ignored in the child across exec.
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        SpawnAttributes.configure(&attributes, newSession: false)

        var pid: pid_t = 0
        let started = ContinuousClock.now
        let result = posix_spawn(&pid, executable, &fileActions, &attributes, cArguments, cEnvironment)
        guard result == 0 else {
            throw BenchError("could not start \(executable): \(String(cString: strerror(result)))")
        }
        Cleanup.shared.adopt(child: pid)
        return ChildProcess(pid: pid, stdoutPath: stdoutPath, stderrPath: stderrPath, started: started)
    }

    /// Waits for the child to exit (on a thread of its own); returns its wait status and when it
    /// was reaped.
    func wait() async throws -> (status: Int32, ended: ContinuousClock.Instant) {
        let pid = self.pid
        let result = try await onOwnThread { () -> (Int32, ContinuousClock.Instant) in
            var status: Int32 = 0
            while waitpid(pid, &status, 0) == -1 {
                guard errno == EINTR else { throw BenchError("waitpid(\(pid)): \(String(cString: strerror(errno)))") }
            }
            return (status, ContinuousClock.now)
        }
        Cleanup.shared.release(child: pid)
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
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { throw BenchError("socket path too long: \(path)") }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        while true {
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw BenchError("socket: \(String(cString: strerror(errno)))") }
            let result = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
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

/// `prctl(PR_SET_THP_DISABLE)`: the flag is inherited by children and kept across execve, so
/// setting it around a spawn gives that child (and the QEMU it starts) no huge pages.
enum TransparentHugePages {
    private typealias Prctl = @convention(c) (Int32, UInt, UInt, UInt, UInt) -> Int32
    private static let setDisable: Int32 = 41  // PR_SET_THP_DISABLE
    private static let getDisable: Int32 = 42  // PR_GET_THP_DISABLE

    /// prctl is variadic in C, which Swift does not import; look it up and call it with the fixed
    /// integer arguments the kernel reads (the x86-64 calling convention passes them the same way).
    private static var prctl: Prctl? {
        guard let symbol = dlsym(nil, "prctl") else { return nil }
        return unsafeBitCast(symbol, to: Prctl.self)
    }

    /// Runs `body` with THP disabled for this process (and what it spawns meanwhile).
    static func disabled<T>(_ body: () throws -> T) throws -> T {
        guard let prctl else { throw BenchError("prctl is not available") }
        let before = prctl(getDisable, 0, 0, 0, 0)
        guard prctl(setDisable, 1, 0, 0, 0) == 0 else { throw BenchError("prctl(PR_SET_THP_DISABLE): \(String(cString: strerror(errno)))") }
        defer { _ = prctl(setDisable, before > 0 ? 1 : 0, 0, 0, 0) }
        return try body()
    }

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

extension Duration {
    var benchSeconds: Double {
        let (whole, fraction) = components
        return Double(whole) + Double(fraction) / 1e18
    }
}
