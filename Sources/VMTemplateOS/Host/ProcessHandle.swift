import CLinuxHost
import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What to start and how: the one way vmtemplate (and its benchmark) starts a long-lived child.
public struct SpawnRequest: Sendable {
    public var executable: String
    public var arguments: [String]
    /// Extra environment variables on top of this process's own.
    public var environment: [String: String] = [:]
    /// stdout goes here (created 0600 if missing); stderr too unless `stderrPath` is given.
    public var stdoutPath: String
    public var stderrPath: String?
    /// Truncate the output files instead of appending to them.
    public var truncateOutput = false
    /// A session of its own (`setsid`): a Ctrl-C or a hang-up in the caller's terminal does not
    /// reach the child. QEMU gets one, so a VM outlives the CLI that started it.
    public var newSession = false
    /// Descriptors handed to the child: `descriptor` in this process becomes `as` in the child.
    /// Everything else is closed in the child.
    public var inherited: [(descriptor: Int32, as: Int32)] = []
    /// Transparent huge pages for the child (PR_SET_THP_DISABLE is inherited across exec).
    public var transparentHugePages = true
    /// The child's umask (inherited across exec); nil keeps this process's.
    public var umask: mode_t?

    public init(executable: String, arguments: [String], stdoutPath: String) {
        self.executable = executable
        self.arguments = arguments
        self.stdoutPath = stdoutPath
    }
}

/// One process this program may signal and wait for, named by a pidfd.
///
/// A PID alone can be reused by an unrelated process the moment the original exits; a pidfd keeps
/// naming the one process it was opened on, so a signal sent through it cannot reach another. A
/// handle on a process that is not our child is opened first and its identity checked after
/// (start time), so the descriptor is known to name the very process the caller meant.
public final class ProcessHandle: Sendable {
    public let identity: ProcessIdentity
    public var pid: Int32 { identity.pid }
    /// -1 where the kernel has no pidfd (< 5.3): signals are then refused, never sent by PID.
    private let pidfd: Int32
    /// Spawned here: reaped with waitpid, which also yields its exit status.
    private let isChild: Bool
    private let exitStatus = Mutex<Int32?>(nil)

    private init(identity: ProcessIdentity, pidfd: Int32, isChild: Bool) {
        self.identity = identity
        self.pidfd = pidfd
        self.isChild = isChild
    }

    deinit {
        // A child that still runs (or exited unseen) is handed to the reaper where one runs, so
        // that a long-lived process does not keep it as a zombie (``ChildReaper``).
        if isChild {
            reap()
            if exitStatus.withLock({ $0 == nil }), ChildReaper.adopt(pid: identity.pid, pidfd: pidfd) { return }
        }
        if pidfd >= 0 { close(pidfd) }
    }

    // MARK: Starting and finding

    /// Starts `request`; stdin is /dev/null.
    public static func spawn(_ request: SpawnRequest) throws -> ProcessHandle {
        var fileActions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&fileActions)
        defer { posix_spawn_file_actions_destroy(&fileActions) }
        let outputFlags = O_WRONLY | O_CREAT | (request.truncateOutput ? O_TRUNC : O_APPEND)
        posix_spawn_file_actions_addopen(&fileActions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&fileActions, 1, request.stdoutPath, outputFlags, 0o600)
        if let stderrPath = request.stderrPath {
            posix_spawn_file_actions_addopen(&fileActions, 2, stderrPath, outputFlags, 0o600)
        } else {
            posix_spawn_file_actions_adddup2(&fileActions, 1, 2)
        }
        var firstClosed: Int32 = 3
        for (descriptor, target) in request.inherited {
            // dup2 clears close-on-exec on the copy: the child gets it, this process keeps its own.
            posix_spawn_file_actions_adddup2(&fileActions, descriptor, target)
            firstClosed = max(firstClosed, target + 1)
        }
        // Nothing else is inherited: a store lock or a QMP socket held by a long-lived child would
        // outlive the operation that opened it. glibc >= 2.34 has addclosefrom_np, which Swift does
        // not import: looked up at run time. Where it is missing, every fd vmtemplate opens is
        // O_CLOEXEC anyway.
        if let symbol = dlsym(nil, "posix_spawn_file_actions_addclosefrom_np") {
            typealias AddCloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
            _ = unsafeBitCast(symbol, to: AddCloseFrom.self)(&fileActions, firstClosed)
        }

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        // Default dispositions and an empty mask: the caller may block or ignore signals (SIGPIPE,
        // SIGINT) that the child must see, and ignored dispositions survive exec.
        var defaultSignals = sigset_t()
        sigfillset(&defaultSignals)
        var emptyMask = sigset_t()
        sigemptyset(&emptyMask)
        posix_spawnattr_setsigdefault(&attributes, &defaultSignals)
        posix_spawnattr_setsigmask(&attributes, &emptyMask)
        // POSIX_SPAWN_SETSID (glibc >= 2.26) is not imported into Swift: its value is 0x80.
        let setsid: Int32 = request.newSession ? 0x80 : 0
        posix_spawnattr_setflags(&attributes, Int16(setsid | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))

        // This process's own environment, plus what the caller adds (QEMU's malloc tunable).
        var cEnvironment: [UnsafeMutablePointer<CChar>?] = []
        if !request.environment.isEmpty {
            var environment = ProcessInfo.processInfo.environment
            for (key, value) in request.environment { environment[key] = value }
            cEnvironment = environment.map { strdup("\($0.key)=\($0.value)") }
            cEnvironment.append(nil)
        }
        var cArguments: [UnsafeMutablePointer<CChar>?] = ([request.executable] + request.arguments).map { strdup($0) }
        cArguments.append(nil)
        defer {
            for pointer in cEnvironment { free(pointer) }
            for pointer in cArguments { free(pointer) }
        }

        // PR_SET_THP_DISABLE is inherited across fork and exec and has no per-child form: it is
        // set on this process around the spawn and put back after.
        let hugePagesBefore = request.transparentHugePages ? nil : Optional(clinuxhost_thp_disabled())
        if hugePagesBefore != nil { _ = clinuxhost_set_thp_disabled(1) }
        defer { if let before = hugePagesBefore, before >= 0 { _ = clinuxhost_set_thp_disabled(before) } }

        // posix_spawn has no umask attribute: set around the spawn (this process creates no files
        // meanwhile), and the child keeps it.
        let previousMask = request.umask.map { Glibc.umask($0) }
        defer { if let previousMask { Glibc.umask(previousMask) } }

        var pid: pid_t = 0
        let result = cEnvironment.isEmpty
            ? posix_spawn(&pid, request.executable, &fileActions, &attributes, cArguments, environ)
            : posix_spawn(&pid, request.executable, &fileActions, &attributes, cArguments, cEnvironment)
        guard result == 0 else {
            throw VMTemplateError(.notFound, "could not start '\(request.executable)': \(errnoText(result)). Check the path and its permissions.", cause: SystemCallError("posix_spawn", code: result))
        }
        // Our child cannot be reaped by anybody else before we wait for it, so the pidfd opened
        // now names it for sure; the start time makes records that hold the identity unambiguous.
        let descriptor = clinuxhost_pidfd_open(pid)
        let identity = ProcessIdentity.current(pid: pid) ?? ProcessIdentity(pid: pid, startTime: 0)
        return ProcessHandle(identity: identity, pidfd: descriptor >= 0 ? descriptor : -1, isChild: true)
    }

    /// A handle on the process `identity` names, or nil when that process no longer runs (exited,
    /// a zombie, or its PID now belongs to another process).
    public static func open(_ identity: ProcessIdentity) -> ProcessHandle? {
        guard identity.pid > 0 else { return nil }
        let descriptor = clinuxhost_pidfd_open(identity.pid)
        // Checked after the open: if the PID was reused in between, the start time differs.
        guard identity.isAlive else {
            if descriptor >= 0 { close(descriptor) }
            return nil
        }
        return ProcessHandle(identity: identity, pidfd: descriptor >= 0 ? descriptor : -1, isChild: false)
    }

    // MARK: State

    /// Whether the process still runs; reaps it when it is our child and has exited.
    public var isRunning: Bool {
        if isChild {
            reap()
            return exitStatus.withLock { $0 == nil }
        }
        if pidfd >= 0 {
            // A pidfd becomes readable when its process terminates.
            var descriptor = pollfd(fd: pidfd, events: Int16(POLLIN), revents: 0)
            return poll(&descriptor, 1, 0) == 0
        }
        return identity.isAlive
    }

    /// How the process ended (`exited with status 1`, `killed by signal 9`); nil while it runs,
    /// and for a process that is not our child (only its parent learns the status).
    public var exitDescription: String? {
        guard isChild else { return isRunning ? nil : "exited" }
        reap()
        return exitStatus.withLock { status in
            guard let status else { return nil }
            let signal = status & 0x7f
            if signal == 0 { return "exited with status \((status >> 8) & 0xff)" }
            return "killed by signal \(signal)"
        }
    }

    /// Waits up to `timeout` for the process to exit. Returns whether it did.
    @discardableResult
    public func waitForExit(timeout: Duration) async -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if !isRunning { return true }
            // A cancelled task's sleep returns at once: wait on the thread instead of spinning.
            if Task.isCancelled { usleep(2000) } else { try? await Task.sleep(for: .milliseconds(2)) }
        }
        return !isRunning
    }

    /// Waits for the process to exit, blocking this thread (for a dedicated thread, never the
    /// cooperative pool). Returns its wait status when it is our child.
    public func waitBlocking() -> Int32? {
        guard isChild else {
            var descriptor = pollfd(fd: pidfd, events: Int16(POLLIN), revents: 0)
            while pidfd >= 0 && poll(&descriptor, 1, -1) < 0 && errno == EINTR {}
            return nil
        }
        exitStatus.withLock { status in
            guard status == nil else { return }
            var raw: Int32 = 0
            while true {
                let result = waitpid(identity.pid, &raw, 0)
                if result == identity.pid { status = raw; return }
                if result == -1 && errno == EINTR { continue }
                status = 0
                return
            }
        }
        return exitStatus.withLock { $0 }
    }

    // MARK: Signals

    /// Sends `signal` through the pidfd. Returns false when the process had already exited.
    /// Throws when the kernel has no pidfd: sending by PID could hit a reused PID.
    @discardableResult
    public func signal(_ signal: Int32) throws -> Bool {
        guard isRunning else { return false }
        guard pidfd >= 0 else {
            throw VMTemplateError(.unsupported, "this kernel has no pidfd (Linux >= 5.3 needed): vmtemplate signals processes only through one, so that a reused PID is never hit.")
        }
        let result = clinuxhost_pidfd_send_signal(pidfd, signal)
        if result == -ESRCH { return false }
        guard result == 0 else {
            throw VMTemplateError(.ioError, "could not send signal \(signal) to process \(identity.pid): \(errnoText(-result)).", cause: SystemCallError("pidfd_send_signal", code: -result))
        }
        return true
    }

    private func reap() {
        exitStatus.withLock { status in
            guard status == nil else { return }
            var raw: Int32 = 0
            let result = waitpid(identity.pid, &raw, WNOHANG)
            if result == identity.pid {
                status = raw
            } else if result == -1 && errno == ECHILD {
                // Reaped elsewhere (a SIGCHLD handler): fall back to /proc.
                if !identity.isAlive { status = 0 }
            }
        }
    }
}
