import CLinuxHost
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore
import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What a clone's `qemu-guest-agent` is told when the clone starts (``GuestClock/guestAgent``):
/// the host's time (`guest-set-time`), its hostname (`hostname NAME` through `guest-exec`), then
/// the template's `guest_commands`, in order, each awaited before the next.
///
/// Nothing on the clone path waits for the guest. `clone` only connects to the agent's socket
/// before it returns (a connect is queued at once, whether or not QEMU has accepted it yet), and
/// hands that connection to whoever runs the steps: a helper process (`vmtemplate guest-setup`,
/// for a command that exits right after the clone) or a task (for a long-lived process, such as
/// `vmtemplate serve`). QEMU serves one client per socket: a runtime's own first connection, made
/// after `clone` returned, waits in the backlog until these steps are done, so its first command
/// finds the clock, hostname and identity renewed. The record's `guest_setup` says `running`,
/// then `done` or `failed`; each step's outcome goes to the clone's guest-setup.log.
public struct GuestAgentSetup: Sendable, Codable, Equatable {
    public var cloneID: String
    public var hostname: String
    /// The template's `guest_commands`, as written: placeholders are filled in when they run
    /// (`{random}` must never be in a helper's arguments, which every local user can read).
    public var commands: [[String]]

    /// How long all the steps may take: a guest that needs longer is one no runtime can talk to
    /// either; the connection is then closed, so runtimes are not held behind it.
    public static let timeout = Duration.seconds(120)

    public init(cloneID: String, hostname: String, commands: [[String]]) {
        self.cloneID = cloneID
        self.hostname = hostname
        self.commands = commands
    }

    enum CodingKeys: String, CodingKey {
        case cloneID = "clone_id"
        case hostname, commands
    }

    /// The checks steps from outside this process (a helper's channel) must pass.
    public func check() throws {
        _ = try EntityName(hostname, kind: "clone")
        _ = try EntityName(cloneID, kind: "clone")
        try GuestCommand.check(commands, key: "guest_commands")
    }

    /// The steps in order: what each is called in the log, and what it does.
    var steps: [(name: String, run: (GuestAgentConnection, ContinuousClock.Instant) throws -> String)] {
        var steps: [(name: String, run: (GuestAgentConnection, ContinuousClock.Instant) throws -> String)] = [
            ("guest-set-time", { agent, deadline in
                // The time when the agent takes it, not when the clone was made.
                let nanoseconds = Int64((Date().timeIntervalSince1970 * 1e9).rounded())
                try agent.execute("guest-set-time", arguments: ["time": nanoseconds], until: deadline)
                return "ok"
            }),
        ]
        for command in [["hostname", hostname]] + commands {
            // Logged as written: `{random}` stays a placeholder there.
            steps.append((command.joined(separator: " "), { agent, deadline in
                let random = (0..<32).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
                let result = try agent.run(GuestCommand.expand(command, hostname: hostname, id: cloneID, random: random), shown: command, until: deadline)
                guard result.succeeded else {
                    let said = result.lastWords
                    throw VMTemplateError(.qemuFailed, "\(result.ending)\(said.isEmpty ? "" : ": \(said)")")
                }
                return "ok (exit 0)"
            }))
        }
        return steps
    }

    /// Runs every step on `agent` (blocking: call it on a thread of its own), each one's outcome
    /// written to `log` as one line; a step that fails does not stop the next. True when all
    /// succeeded. The caller closes the connection.
    public func run(on agent: GuestAgentConnection, log: (String) -> Void) -> Bool {
        let deadline = ContinuousClock.now + Self.timeout
        do {
            try agent.synchronize(until: deadline)
        } catch {
            log("guest agent: no answer (\(error)); nothing was set")
            return false
        }
        var allDone = true
        for step in steps {
            do {
                log("\(TerminalText.escape(step.name)): \(try step.run(agent, deadline))")
            } catch {
                allDone = false
                log("\(TerminalText.escape(step.name)): failed: \(error)")
                if ContinuousClock.now >= deadline { break }
            }
        }
        return allDone
    }

    /// Runs the steps on `fd` (a connection to the clone's agent socket, taken over) and records
    /// the outcome in the clone's record and log.
    public func runAndRecord(fd: Int32, path: String, store: TemplateStore) async {
        let logPath = store.cloneLayout(cloneID).guestSetupLog
        let plan = self
        let succeeded = (try? await onOwnThread {
            let log = open(logPath, O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0o600)
            defer { if log >= 0 { close(log) } }
            let agent = GuestAgentConnection(fd: fd, path: path)
            defer { agent.close() }
            // Milliseconds: a step under emulation takes tenths of a second.
            let stamps = ISO8601DateFormatter()
            stamps.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
            return plan.run(on: agent) { line in
                let bytes = Array("\(stamps.string(from: Date())) \(line)\n".utf8)
                _ = bytes.withUnsafeBytes { write(log, $0.baseAddress, $0.count) }
            }
        }) ?? false
        // The clone's own record write (`running`) comes right after the connection was handed
        // over: a setup that ended at once (QEMU gone) must not be overwritten by it.
        let recorded = ContinuousClock.now + .seconds(5)
        while ContinuousClock.now < recorded, let record = store.cloneRecord(cloneID), record.guestSetup != "running" {
            try? await Task.sleep(for: .milliseconds(20))
        }
        _ = try? await store.updateClone(cloneID) { $0.guestSetup = succeeded ? "done" : "failed" }
    }
}

extension GuestAgentSetup {
    /// How the steps are run once `clone` has the connection.
    public enum Runner: Sendable {
        /// A helper process started before the clone was restored (``startHelper(executable:store:)``),
        /// waiting on `channel`: it is sent the steps and the connection (SCM_RIGHTS) and runs them
        /// in a session of its own, so it outlives a CLI that exits right after the clone. Started
        /// early, its start-up (a second copy of the CLI) overlaps QEMU's restore, when the CLI only
        /// waits, instead of the resumed guest's first moments.
        case helper(channel: Int32)
        /// A task of this process (a long-lived one, such as `vmtemplate serve`, or a test).
        case task
    }

    /// The fd a helper finds its channel on.
    public static let helperDescriptor: Int32 = 3
    /// The most a helper reads from its channel: the steps are at most ``GuestCommand/maxTotalBytes``.
    static let maxPlanBytes = 256 * 1024

    /// Starts `EXECUTABLE guest-setup --store ROOT`, its fd 3 one end of a socket pair; returns the
    /// other end (close-on-exec), which the caller closes once it has handed the helper its steps,
    /// or when it gives up (the helper then reads an empty channel and exits).
    public static func startHelper(executable: String, store: TemplateStore) throws -> Int32 {
        var ends: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &ends) == 0 else {
            throw VMTemplateError(.ioError, "cannot make the guest setup helper's channel: \(errnoText()).", cause: SystemCallError("socketpair"))
        }
        defer { close(ends[1]) }
        do {
            var request = SpawnRequest(executable: executable, arguments: ["guest-setup", "--store", store.root], stdoutPath: "/dev/null")
            request.newSession = true
            request.inherited = [(ends[1], helperDescriptor)]
            _ = try ProcessHandle.spawn(request)
            return ends[0]
        } catch {
            close(ends[0])
            throw error
        }
    }

    /// In the helper: the steps and the agent connection `clone` sent on `channel`, or nil when it
    /// sent none (the clone failed before it resumed). Bounded; the steps are checked.
    public static func receive(on channel: Int32) throws -> (setup: GuestAgentSetup, agent: Int32)? {
        var data: [UInt8] = []
        var agent: Int32 = -1
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            var descriptor: Int32 = -1
            let count = buffer.withUnsafeMutableBytes { clinuxhost_receive_with_fd(channel, $0.baseAddress, UInt($0.count), &descriptor) }
            if descriptor >= 0 {
                if agent < 0 { agent = descriptor } else { close(descriptor) }
            }
            guard count > 0 else {
                if count < 0 { if agent >= 0 { close(agent) }; throw VMTemplateError(.ioError, "cannot read the guest setup channel: \(errnoText(Int32(-count))).") }
                break
            }
            data += buffer[..<count]
            guard data.count <= maxPlanBytes else {
                if agent >= 0 { close(agent) }
                throw VMTemplateError(.invalidArgument, "the guest setup channel carried more than \(maxPlanBytes) bytes.")
            }
        }
        guard agent >= 0 else { return nil }
        do {
            let setup = try JSONDecoder().decode(GuestAgentSetup.self, from: Data(data))
            try setup.check()
            return (setup, agent)
        } catch {
            close(agent)
            throw error
        }
    }

    /// Connects to the clone's agent now and leaves the steps to `runner`. Returns what the record
    /// says of it: `running`, or `failed` (why: in the log).
    static func start(_ setup: GuestAgentSetup, store: TemplateStore, runner: Runner) -> String {
        let layout = store.cloneLayout(setup.cloneID)
        let socket = layout.instance.agentSocket
        do {
            let agent = try GuestAgentConnection.connect(path: socket)
            let fd = agent.descriptor
            switch runner {
            case .task:
                Task.detached { await setup.runAndRecord(fd: fd, path: socket, store: store) }
            case .helper(let channel):
                // The helper keeps its own copy of the connection; this one is closed.
                defer { agent.close() }
                let plan = Array(try JSONEncoder().encode(setup))
                let sent = plan.withUnsafeBytes { clinuxhost_send_with_fd(channel, $0.baseAddress, UInt($0.count), fd) }
                guard sent == plan.count else {
                    throw VMTemplateError(.ioError, "the guest setup helper did not take its steps (\(sent < 0 ? errnoText(Int32(-sent)) : "short write")): it may have failed to start.")
                }
            }
            return "running"
        } catch {
            try? FileSystem.writeFileAtomically(path: layout.guestSetupLog, data: Array("not started: \(error)\n".utf8), mode: 0o600, durable: false)
            return "failed"
        }
    }
}
