import CLinuxHost
import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One QEMU process, owned from spawn to reap.
///
/// QEMU is spawned in a session of its own (`setsid`): a Ctrl-C or a hang-up in the caller's
/// terminal must not kill a VM behind the store's back, and a clone must outlive the CLI that
/// started it. Its stdout and stderr go to a log file, so that when it dies the error can show why.
public final class QEMUProcess: Sendable {
    public let pid: Int32
    public let identity: ProcessIdentity
    public let logPath: String
    private let exitStatus = Mutex<Int32?>(nil)

    private init(pid: Int32, identity: ProcessIdentity, logPath: String) {
        self.pid = pid
        self.identity = identity
        self.logPath = logPath
    }

    /// Starts `executable` with `arguments`; stdin is /dev/null, stdout and stderr append to `logPath`.
    ///
    /// `transparentHugePages: false` keeps QEMU from backing its translation cache and small RAM
    /// blocks with 2 MiB pages it barely touches: an idle clone's own memory drops from ~17 to
    /// ~14 MiB with no slowdown (docs/benchmarks.md). QEMU has no option for it; the
    /// `PR_SET_THP_DISABLE` flag is inherited across fork and exec, so it is set on the spawning
    /// process, where it only affects this short-lived CLI's own allocations.
    ///
    /// `qmpListener` is given to QEMU as fd 3, for a command line rendered with
    /// `QMPEndpoint.inheritedListener`.
    public static func spawn(executable: String, arguments: [String], logPath: String, qmpListener: QMPListener? = nil, transparentHugePages: Bool = true) throws -> QEMUProcess {
        if !transparentHugePages {
            // Failure only costs memory, never correctness: no error to report.
            _ = clinuxhost_disable_transparent_huge_pages()
        }
        var fileActions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&fileActions)
        defer { posix_spawn_file_actions_destroy(&fileActions) }
        posix_spawn_file_actions_addopen(&fileActions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&fileActions, 1, logPath, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&fileActions, 1, 2)
        var firstClosed: Int32 = 3
        if let qmpListener {
            // dup2 clears close-on-exec on the copy: QEMU gets the listener, this process keeps its own.
            posix_spawn_file_actions_adddup2(&fileActions, qmpListener.descriptor, QMPListener.inheritedDescriptor)
            firstClosed = QMPListener.inheritedDescriptor + 1
        }
        // Nothing else is inherited: a store lock or a QMP socket held by a long-lived QEMU
        // would outlive the operation that opened it.
        // glibc >= 2.34 has addclosefrom_np, but Swift does not import it: look it up at run time.
        // Where it is missing, every fd vmtemplate opens is O_CLOEXEC anyway.
        if let symbol = dlsym(nil, "posix_spawn_file_actions_addclosefrom_np") {
            typealias AddCloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
            _ = unsafeBitCast(symbol, to: AddCloseFrom.self)(&fileActions, firstClosed)
        }

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        SpawnAttributes.configure(&attributes, newSession: true)

        let argv = [executable] + arguments
        var cArguments: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) }
        cArguments.append(nil)
        defer { for pointer in cArguments { free(pointer) } }

        var pid: pid_t = 0
        let result = posix_spawn(&pid, executable, &fileActions, &attributes, cArguments, environ)
        guard result == 0 else {
            throw VMTemplateError(.qemuFailed, "could not start QEMU '\(executable)': \(errnoText(result)). Check the path and its permissions (vmtemplate doctor).")
        }
        // The start time makes the identity unambiguous: a record holding only a PID could later
        // point at an unrelated process that reused it.
        let identity = ProcessIdentity.current(pid: pid) ?? ProcessIdentity(pid: pid, startTime: 0)
        return QEMUProcess(pid: pid, identity: identity, logPath: logPath)
    }

    /// Whether the process is still running; reaps it when it has exited.
    public var isRunning: Bool {
        reap(blocking: false)
        return exitStatus.withLock { $0 == nil }
    }

    /// How the process ended (`exited with status 1`, `killed by signal 9`), or nil while it runs.
    public var exitDescription: String? {
        reap(blocking: false)
        return exitStatus.withLock { status in
            guard let status else { return nil }
            let signal = status & 0x7f
            if signal == 0 { return "exited with status \((status >> 8) & 0xff)" }
            return "killed by signal \(signal)"
        }
    }

    /// How the process ended, waiting up to `timeout` for it to end: a closed QMP socket usually
    /// means QEMU is exiting, and its exit status and last words are what the user needs to see.
    public func exitDescription(within timeout: Duration) async -> String? {
        await waitForExit(timeout: timeout)
        return exitDescription
    }

    /// The last `lines` lines QEMU wrote to stdout/stderr.
    public func logTail(lines: Int = 20) -> String {
        LogTail.lastLines(ofFile: logPath, count: lines)
    }

    /// Waits up to `timeout` for the process to exit. Returns whether it did.
    @discardableResult
    public func waitForExit(timeout: Duration) async -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if !isRunning { return true }
            try? await Task.sleep(for: .milliseconds(2))
        }
        return !isRunning
    }

    /// Sends `signal` to the process if it still runs.
    public func signal(_ signal: Int32) {
        if isRunning { kill(pid, signal) }
    }

    /// Stops the process with a ladder: an optional polite request (QMP `quit`), then SIGTERM, then
    /// SIGKILL after `grace`. Always reaps it.
    public func terminate(grace: Duration = .seconds(3), politely polite: (@Sendable () async -> Void)? = nil) async {
        if let polite, isRunning {
            await polite()
            if await waitForExit(timeout: grace) { return }
        }
        signal(SIGTERM)
        if await waitForExit(timeout: grace) { return }
        signal(SIGKILL)
        await waitForExit(timeout: .seconds(10))
    }

    private func reap(blocking: Bool) {
        exitStatus.withLock { status in
            guard status == nil else { return }
            var raw: Int32 = 0
            let result = waitpid(pid, &raw, blocking ? 0 : WNOHANG)
            if result == pid {
                status = raw
            } else if result == -1 && errno == ECHILD {
                // Not our child (already reaped elsewhere): fall back to /proc.
                if !identity.isAlive { status = 0 }
            }
        }
    }
}

/// `posix_spawn` attributes every child of vmtemplate gets.
public enum SpawnAttributes {
    /// Default signal dispositions and an empty mask: the caller may block or ignore signals
    /// (SIGPIPE, SIGINT) that the child must see, and ignored dispositions survive exec.
    /// `newSession` puts the child in a session of its own (`setsid`).
    public static func configure(_ attributes: inout posix_spawnattr_t, newSession: Bool) {
        var defaultSignals = sigset_t()
        sigfillset(&defaultSignals)
        var emptyMask = sigset_t()
        sigemptyset(&emptyMask)
        posix_spawnattr_setsigdefault(&attributes, &defaultSignals)
        posix_spawnattr_setsigmask(&attributes, &emptyMask)
        // POSIX_SPAWN_SETSID (glibc >= 2.26) is not imported into Swift: its value is 0x80.
        let setsid: Int32 = newSession ? 0x80 : 0
        posix_spawnattr_setflags(&attributes, Int16(setsid | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
    }
}

/// Reads the end of a log file without loading all of it.
enum LogTail {
    static func lastLines(ofFile path: String, count: Int, maxBytes: Int = 16 * 1024) -> String {
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
