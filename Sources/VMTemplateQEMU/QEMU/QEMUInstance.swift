import Foundation
import VMTemplateOS

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One QEMU, from spawn to reap: its command line, its pre-bound QMP listener, the QMP connection,
/// its process identity, what to say when it dies, and the one way to stop it.
///
/// It is also the one place that decides whether a process is this instance's QEMU before anything
/// signals it (``attach(identity:name:qmpSocket:logPath:executable:)``): a record on disk only
/// *claims* a PID, and a PID can belong to anybody by the time it is read.
///
/// QEMU runs in a session of its own: a Ctrl-C or a hang-up in the caller's terminal must not kill
/// a VM behind the store's back, and a clone must outlive the CLI that started it. Its stdout and
/// stderr go to a log file, so that when it dies the error can show why.
public final class QEMUInstance: Sendable {
    /// The `-name` it runs with: how its command line is recognised.
    public let name: String
    public let qmpSocket: String
    public let logPath: String
    /// `/proc/PID/exe` right after the spawn (posix_spawn returns once the exec is done): what a
    /// record keeps to recognise this QEMU later.
    public let executable: String?
    private let process: ProcessHandle

    public var identity: ProcessIdentity { process.identity }
    public var pid: Int32 { process.pid }

    /// How ``stop(grace:politely:qmp:)`` ended the process.
    /// Fixed words, as JSON and the API print them: `quit` (it obeyed QMP `quit`), `terminated`
    /// (SIGTERM), `killed` (SIGKILL), `already-exited`.
    public enum StopResult: String, Sendable, Codable {
        case quit
        case terminated
        case killed
        case alreadyExited = "already-exited"
    }

    private init(name: String, qmpSocket: String, logPath: String, process: ProcessHandle) {
        self.name = name
        self.qmpSocket = qmpSocket
        self.logPath = logPath
        self.process = process
        self.executable = QEMUIdentity.readExecutable(pid: process.pid)
    }

    // MARK: Starting

    /// Starts QEMU with `arguments` (``QEMUCommandLine/arguments()``, or a benchmark's variant of
    /// them); `name`, `paths` and `qmp` must be what the arguments say. A monitor on an inherited
    /// listener gets one bound here first (``QMPListener``), so clients can connect the instant
    /// QEMU runs.
    ///
    /// `transparentHugePages: false` keeps QEMU from backing its translation cache and small RAM
    /// blocks with 2 MiB pages it barely touches: an idle clone's own memory drops from ~17 to
    /// ~14 MiB with no slowdown (docs/benchmarks.md).
    public static func launch(arguments: [String], name: String, paths: InstancePaths, qmp: QMPEndpoint, executable: String, transparentHugePages: Bool = true) throws -> QEMUInstance {
        // The listener's scope ends with the spawn: this process's copy closes, QEMU's stays.
        let listener = qmp == .inheritedListener ? try QMPListener(path: paths.qmpSocket) : nil
        var request = SpawnRequest(executable: executable, arguments: arguments, stdoutPath: paths.qemuLog)
        request.newSession = true
        request.transparentHugePages = transparentHugePages
        // One malloc arena: QEMU's threads allocate little, and each extra arena is memory an idle
        // clone keeps (~0.3 MiB measured, docs/scaling.md). A tunable the caller set stays.
        if ProcessInfo.processInfo.environment["GLIBC_TUNABLES"] == nil {
            request.environment["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=1"
        }
        // What QEMU creates (the control socket, the console log) is its owner's alone: guest
        // consoles and control channels carry secrets.
        request.umask = 0o077
        if let listener { request.inherited = [(listener.descriptor, QMPListener.inheritedDescriptor)] }
        let process: ProcessHandle
        do {
            process = try ProcessHandle.spawn(request)
        } catch let error as VMTemplateError {
            throw VMTemplateError(.qemuFailed, "could not start QEMU '\(executable)': check the path and its permissions (vmtemplate doctor).", cause: error.cause ?? error)
        }
        return QEMUInstance(name: name, qmpSocket: paths.qmpSocket, logPath: paths.qemuLog, process: process)
    }

    // MARK: Finding a running one

    /// What ``attach(identity:name:qmpSocket:logPath:executable:)`` found.
    public enum Attachment: Sendable {
        /// The process is this instance's QEMU and still runs.
        case running(QEMUInstance)
        /// Nothing runs under that identity any more.
        case exited
        /// A process runs under that PID and start time but is not this instance's QEMU, or
        /// cannot be checked (another user's process): it must not be touched.
        case notThisQEMU(reason: String)
    }

    /// Finds the QEMU a record claims runs as `identity`, and checks that it is: the same start
    /// time (so not a reused PID), an executable that is a QEMU system emulator (`executable`
    /// exactly, when known), and `-name` `name` on its command line. Only then may it be signalled.
    public static func attach(identity: ProcessIdentity, name: String, qmpSocket: String, logPath: String, executable: String? = nil) -> Attachment {
        // The pidfd is opened first and checked after, so it names the process that was checked.
        guard let process = ProcessHandle.open(identity) else { return .exited }
        if let problem = QEMUIdentity.problem(pid: identity.pid, name: name, executable: executable) {
            return process.isRunning ? .notThisQEMU(reason: problem) : .exited
        }
        return .running(QEMUInstance(name: name, qmpSocket: qmpSocket, logPath: logPath, process: process))
    }

    /// Every running QEMU whose command line carries `-name` `name`, found through `/proc`: for a
    /// clean-up that has nothing but a name (a record that cannot be read).
    /// Only processes of `owners` count: anybody can start a process called `qemu-system-*` with
    /// any `-name`, but it is not a clone's QEMU unless the store's owner (or the QEMU user it
    /// drops to) runs it.
    public static func running(named name: String, ownedBy owners: Set<uid_t>, qmpSocket: String, logPath: String) -> [QEMUInstance] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { entry -> QEMUInstance? in
            var info = stat()
            guard let pid = Int32(entry), pid != getpid(), stat("/proc/\(pid)", &info) == 0, owners.contains(info.st_uid),
                  case .success(let bytes) = FileSystem.readContents(path: "/proc/\(pid)/cmdline"),
                  QEMUIdentity.problem(commandLine: bytes, name: name) == nil,
                  let identity = ProcessIdentity.current(pid: pid),
                  case .running(let instance) = attach(identity: identity, name: name, qmpSocket: qmpSocket, logPath: logPath)
            else { return nil }
            return instance
        }
    }

    // MARK: State

    public var isRunning: Bool { process.isRunning }

    /// How the process ended (`exited with status 1`, `killed by signal 9`), or nil while it runs.
    public var exitDescription: String? { process.exitDescription }

    /// The last `lines` lines QEMU wrote to stdout/stderr.
    public func logTail(lines: Int = 20) -> String {
        LogTail.lastLines(ofFile: logPath, count: lines)
    }

    @discardableResult
    public func waitForExit(timeout: Duration) async -> Bool {
        await process.waitForExit(timeout: timeout)
    }

    /// Waits for it to exit, blocking this thread (a clean-up on a thread of its own, after a kill).
    public func waitForExitBlocking() {
        _ = process.waitBlocking()
    }

    /// If QEMU has exited (waiting up to a second for it: a closed QMP socket usually means it is
    /// exiting), an error that says so during `phase`, with its exit status and last words.
    public func exitError(during phase: String, advice: String = "see its output below; 'vmtemplate doctor' checks the installation") async -> VMTemplateError? {
        await process.waitForExit(timeout: .seconds(1))
        guard let how = process.exitDescription else { return nil }
        return VMTemplateError(.qemuFailed, "QEMU \(how) during \(phase): \(advice).", cause: QEMUExit(how: how, lastWords: logTail()))
    }

    // MARK: QMP

    /// Connects to its QMP monitor (see ``QMPClient/connect(socketPath:timeout:isPeerAlive:pipelining:)``).
    /// A QEMU that dies meanwhile fails the connection with its exit status and last words; an
    /// error reply to a pipelined command is thrown as the `QMPError` it is.
    public func connectQMP(timeout: Duration, pipelining: [QMPCommand] = [], passing descriptor: Int32? = nil, phase: String = "start-up") async throws -> QMPClient {
        let process = self.process
        do {
            return try await QMPClient.connect(socketPath: qmpSocket, timeout: timeout, isPeerAlive: { process.isRunning }, pipelining: pipelining, passing: descriptor)
        } catch let error as QMPError {
            throw error
        } catch {
            throw await exitError(during: phase) ?? error
        }
    }

    // MARK: Stopping

    /// Stops QEMU with a ladder: QMP `quit` (on `qmp`, or a connection of its own; skipped when
    /// not `politely`), then SIGTERM, then SIGKILL, waiting `grace` after each. Always reaps it.
    @discardableResult
    public func stop(grace: Duration = .seconds(3), politely: Bool = true, qmp: QMPClient? = nil) async throws -> StopResult {
        guard process.isRunning else { return .alreadyExited }
        if politely {
            if let qmp {
                try? await qmp.quit()
            } else if let own = try? await QMPClient.connect(socketPath: qmpSocket, timeout: .seconds(1), isPeerAlive: { [process] in process.isRunning }) {
                try? await own.quit()
                own.close()
            }
            if await process.waitForExit(timeout: grace) { return .quit }
        }
        if try !process.signal(SIGTERM) { return politely ? .quit : .alreadyExited }
        if await process.waitForExit(timeout: grace) { return .terminated }
        try process.signal(SIGKILL)
        if await process.waitForExit(timeout: .seconds(10)) { return .killed }
        throw VMTemplateError(.qemuFailed, "QEMU \(pid) (\(name)) did not stop even after SIGKILL: check the process by hand (it may be stuck in the kernel).")
    }

    /// SIGKILL at once: the memory comes back now, nothing is saved. Returns false when it had
    /// already exited.
    @discardableResult
    public func kill() throws -> Bool {
        try process.signal(SIGKILL)
    }
}

/// QEMU ended: how, and what it printed last. The cause of errors about a QEMU that died.
package struct QEMUExit: Error, Sendable, CustomStringConvertible {
    public let how: String
    public let lastWords: String

    public var description: String { lastWords.isEmpty ? "(QEMU printed nothing)" : lastWords }
}

/// The check behind ``QEMUInstance/attach(identity:name:qmpSocket:logPath:executable:)``.
public enum QEMUIdentity {
    /// Why `pid` is not the QEMU called `name`, or nil when it is.
    package static func problem(pid: Int32, name: String, executable: String?) -> String? {
        guard let running = readExecutable(pid: pid) else {
            return problemWithoutExecutable(pid: pid, name: name, executable: executable)
        }
        let base = running.split(separator: "/").last.map(String.init) ?? running
        guard base.hasPrefix("qemu-system-") || base == "qemu-kvm" else {
            return "process \(pid) runs \(running), not a QEMU system emulator"
        }
        if let executable {
            guard running == executable || running == FileSystem.resolvedPath(executable) else {
                return "process \(pid) runs \(running), not \(executable)"
            }
        }
        guard case .success(let bytes) = FileSystem.readContents(path: "/proc/\(pid)/cmdline") else {
            return "cannot read /proc/\(pid)/cmdline"
        }
        return problem(commandLine: bytes, name: name).map { "process \(pid) \($0)" }
    }

    /// Without CAP_SYS_PTRACE (vmtemplate.service's bounding set leaves it out) root may not read
    /// the `exe` link of a QEMU that dropped to ``QEMUConfinement/systemUser``. Such a process can
    /// only have been started by root, so it is recognised by its owner, the program its command
    /// line ran, and its `-name` (its start time was checked through the caller's pidfd).
    static func problemWithoutExecutable(pid: Int32, name: String, executable: String?) -> String? {
        let unreadable = "cannot read /proc/\(pid)/exe (another user's process?)"
        var buffer = [CChar](repeating: 0, count: 8)
        guard readlink("/proc/\(pid)/exe", &buffer, buffer.count) < 0, errno == EACCES,
              let qemuUser = getpwnam(QEMUConfinement.systemUser)?.pointee.pw_uid else { return unreadable }
        var info = stat()
        guard stat("/proc/\(pid)", &info) == 0, info.st_uid == qemuUser,
              case .success(let bytes) = FileSystem.readContents(path: "/proc/\(pid)/cmdline") else { return unreadable }
        let program = String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
        let base = program.split(separator: "/").last.map(String.init) ?? program
        guard base.hasPrefix("qemu-system-") || base == "qemu-kvm" else {
            return "process \(pid) of \(QEMUConfinement.systemUser) runs \(TerminalText.escape(String(program.prefix(80)))), not a QEMU system emulator"
        }
        if let executable, program != executable, program != FileSystem.resolvedPath(executable) {
            return "process \(pid) runs \(TerminalText.escape(String(program.prefix(80)))), not \(executable)"
        }
        return problem(commandLine: bytes, name: name).map { "process \(pid) \($0)" }
    }

    /// The pure part: whether a NUL-separated command line carries `-name NAME`.
    package static func problem(commandLine bytes: [UInt8], name: String) -> String? {
        guard !name.isEmpty else { return "has no name to check" }
        // Each argument ends with a NUL, the last one too.
        let arguments = bytes.split(separator: 0, omittingEmptySubsequences: false).dropLast(bytes.last == 0 ? 1 : 0).map { String(decoding: $0, as: UTF8.self) }
        let rendered = QEMUOptionString.render(type: name, [])
        for index in arguments.indices.dropLast() where arguments[index] == "-name" {
            if arguments[index + 1] == rendered { return nil }
        }
        return "is not the QEMU named '\(name)'"
    }

    /// `/proc/PID/exe`, without the " (deleted)" the kernel appends once the binary was replaced
    /// (a package upgrade while the clone runs).
    static func readExecutable(pid: Int32) -> String? {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let count = readlink("/proc/\(pid)/exe", &buffer, buffer.count - 1)
        guard count > 0 else { return nil }
        var path = String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if path.hasSuffix(" (deleted)") { path.removeLast(" (deleted)".count) }
        return path
    }
}

/// Reads the end of a log file without loading all of it.
package enum LogTail {
    package static func lastLines(ofFile path: String, count: Int, maxBytes: Int = 16 * 1024) -> String {
        guard let handle = FileHandle(forReadingAtPath: path) else { return "" }
        defer { try? handle.close() }
        let size = (try? handle.seekToEnd()) ?? 0
        let start = size > UInt64(maxBytes) ? size - UInt64(maxBytes) : 0
        try? handle.seek(toOffset: start)
        let data = (try? handle.readToEnd()) ?? Data()
        let text = String(decoding: data, as: UTF8.self)
        // Serial consoles end lines with CR LF.
        let lines = text.split(whereSeparator: { $0 == "\n" || $0 == "\r\n" || $0 == "\r" })
        return lines.suffix(count).joined(separator: "\n")
    }
}
