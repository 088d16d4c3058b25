import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A QEMU the bench started itself (floor, Kata-style clone, cold boot).
struct BenchVM: Sendable {
    let qemu: QEMUInstance
    let directory: String
    let paths: InstancePaths

    /// `qmp` must say how `arguments` renders the QMP monitor: vmtemplate's own command lines
    /// take a listening socket as fd 3, Kata's binds its socket path itself.
    static func spawn(_ workspace: Workspace, qmp: QMPEndpoint = .inheritedListener, arguments: (InstancePaths) throws -> [String]) throws -> (vm: BenchVM, started: ContinuousClock.Instant) {
        let directory = try workspace.newInstanceDirectory()
        let paths = InstancePaths(directory: directory)
        let rendered = try arguments(paths)
        // The clock starts before the listener and the spawn, as for the CLI: exec and dynamic
        // linking are part of what a user waits for.
        let started = ContinuousClock.now
        let qemu = try QEMUInstance.launch(arguments: rendered, name: Workspace.benchQEMUName, paths: paths, qmp: qmp, executable: workspace.qemuPath)
        Cleanup.shared.adopt(qemu: qemu)
        return (BenchVM(qemu: qemu, directory: directory, paths: paths), started)
    }

    /// Kills it (nothing to save) and removes its directory.
    func stop() async {
        _ = try? await qemu.stop(grace: .zero, politely: false)
        Cleanup.shared.release(qemu: qemu)
        try? FileSystem.removeTree(path: directory)
    }

    func failure(_ what: String, _ error: any Error) -> BenchError {
        let how = qemu.exitDescription.map { "QEMU \($0); " } ?? ""
        return BenchError("\(what): \(how)\(error)\n\(qemu.logTail(lines: 8))")
    }
}

enum Runners {
    // MARK: Floor

    /// When a floor QEMU got somewhere: its QMP greeting, and its answer to the first command.
    struct FloorTimes: Sendable {
        var greeting: Double
        var firstReply: Double
    }

    /// Blocks until QEMU's QMP greeting line arrives, then sends `qmp_capabilities` and waits for
    /// the answer. The greeting comes from the monitor's own I/O thread as soon as the socket
    /// accepts, which QEMU sets up before it builds the machine; commands run in the main loop,
    /// after the machine is built. So the first reply is when QEMU is really ready.
    private static func awaitGreeting(_ vm: BenchVM, started: ContinuousClock.Instant) async throws -> (greeting: ContinuousClock.Instant, firstReply: ContinuousClock.Instant) {
        let process = vm.qemu
        let socketPath = vm.paths.qmpSocket
        do {
            return try await onOwnThread {
                let deadline = started + .seconds(60)
                let socket = try LineSocket.connect(path: socketPath, deadline: deadline, isAlive: { process.isRunning })
                let line = try socket.readLine(deadline: deadline)
                let arrived = ContinuousClock.now
                guard line.contains("\"QMP\"") else { throw BenchError("unexpected first QMP line: \(line)") }
                try socket.writeLine(#"{"execute":"qmp_capabilities"}"#)
                let reply = try socket.readLine(deadline: deadline)
                let replied = ContinuousClock.now
                guard reply.contains("\"return\"") else { throw BenchError("unexpected reply to qmp_capabilities: \(reply)") }
                return (arrived, replied)
            }
        } catch {
            throw vm.failure("floor QEMU", error)
        }
    }

    /// One floor: a clone's QEMU started with `-S`, from spawn to its QMP greeting (and to its
    /// first reply).
    static func floor(_ workspace: Workspace) async throws -> FloorTimes {
        let (vm, started) = try BenchVM.spawn(workspace) { try workspace.floorArguments(paths: $0) }
        let arrived: (greeting: ContinuousClock.Instant, firstReply: ContinuousClock.Instant)
        do {
            arrived = try await awaitGreeting(vm, started: started)
        } catch {
            await vm.stop()
            throw error
        }
        await vm.stop()
        return FloorTimes(greeting: started.duration(to: arrived.greeting).seconds, firstReply: started.duration(to: arrived.firstReply).seconds)
    }

    /// `count` floors started at once: from the first spawn to the last greeting (and the last
    /// first reply).
    static func concurrentFloors(_ workspace: Workspace, count: Int) async throws -> FloorTimes {
        var vms: [BenchVM] = []
        let firstStart = ContinuousClock.now
        do {
            for _ in 0..<count {
                vms.append(try BenchVM.spawn(workspace) { try workspace.floorArguments(paths: $0) }.vm)
            }
            let arrivals = try await withThrowingTaskGroup(of: (greeting: ContinuousClock.Instant, firstReply: ContinuousClock.Instant).self) { group in
                for vm in vms { group.addTask { try await awaitGreeting(vm, started: firstStart) } }
                var all: [(greeting: ContinuousClock.Instant, firstReply: ContinuousClock.Instant)] = []
                for try await arrival in group { all.append(arrival) }
                return all
            }
            for vm in vms { await vm.stop() }
            guard let lastGreeting = arrivals.map(\.greeting).max(), let lastReply = arrivals.map(\.firstReply).max() else {
                return FloorTimes(greeting: .nan, firstReply: .nan)
            }
            return FloorTimes(greeting: firstStart.duration(to: lastGreeting).seconds, firstReply: firstStart.duration(to: lastReply).seconds)
        } catch {
            for vm in vms { await vm.stop() }
            throw error
        }
    }

    // MARK: Kata-style

    /// Kata's factory procedure (template_linux.go, qemu.go bootFromTemplate + waitMigration):
    /// QEMU `-S -incoming defer` on the template opened read-write; over QMP
    /// `migrate-set-capabilities x-ignore-shared`, `migrate-incoming "exec:cat STATE"`,
    /// `query-migrate` every 100 ms until completed, `cont`. Spawn to `cont` answered.
    static func kata(_ workspace: Workspace, check: Bool = false) async throws -> Double {
        let (vm, started) = try BenchVM.spawn(workspace, qmp: .socketPath) { try workspace.kataArguments(paths: $0) }
        do {
            let process = vm.qemu
            let qmp = try await QMPClient.connect(socketPath: vm.paths.qmpSocket, timeout: .seconds(60), isPeerAlive: { process.isRunning })
            defer { qmp.close() }
            try await qmp.migrateSetCapabilities(["x-ignore-shared": true])
            try await qmp.migrateIncoming(uri: "exec:cat '\(workspace.stateFile.replacingOccurrences(of: "'", with: "'\\''"))'")
            let deadline = ContinuousClock.now + .seconds(60)
            while true {
                let info = try await qmp.queryMigrate()
                if info.status == "completed" { break }
                if info.status == "failed" || info.status == "cancelled" {
                    throw BenchError("incoming migration \(info.status ?? "?"): \(info.errorDescription ?? "no reason given")")
                }
                guard ContinuousClock.now < deadline else { throw BenchError("incoming migration did not complete in 60 s") }
                try await Task.sleep(for: .milliseconds(100))
            }
            try await qmp.cont()
            let seconds = started.duration(to: .now).seconds
            if check { _ = try await ControlChannel.request("ping", socket: vm.paths.controlSocket, expecting: "pong") }
            await vm.stop()
            return seconds
        } catch {
            await vm.stop()
            throw vm.failure("Kata-style clone", error)
        }
    }

    // MARK: Cold boot

    /// Boots the guest from its kernel with private RAM until the ready marker is on its console.
    /// Returns the running VM: the caller stops it (or measures it first).
    static func coldBoot(_ workspace: Workspace) async throws -> (seconds: Double, vm: BenchVM) {
        let (vm, started) = try BenchVM.spawn(workspace) { try workspace.coldBootArguments(paths: $0) }
        let watcher = SerialConsoleWatcher(path: vm.paths.serialLog, pollInterval: .milliseconds(2))
        let ready: Bool
        do {
            ready = try await watcher.waitForMarker(workspace.manifest.readyMarker, timeout: .seconds(180), isAlive: { vm.qemu.isRunning })
        } catch {
            await vm.stop()
            throw vm.failure("cold boot", BenchError("no ready marker on the console within 180 s"))
        }
        guard ready else {
            await vm.stop()
            throw vm.failure("cold boot", BenchError("QEMU exited before the ready marker"))
        }
        return (started.duration(to: .now).seconds, vm)
    }
}

// MARK: - The CLI

/// What `vmtemplate clone --json` prints (the members the bench uses).
struct CLIClone: Decodable, Sendable {
    let id: String
    let pid: Int32?
    let controlSocket: String
    /// Where the clone's start took its time, as `clone --json` reports it.
    let timings: CloneTimings?

    enum CodingKeys: String, CodingKey {
        case id, pid, timings
        case controlSocket = "control_socket"
    }
}

/// How a CLI clone is started: extra clone options, environment, and whether QEMU gets THP.
struct CloneSettings: Sendable, Codable {
    var tcgTranslationCacheMiB: Int?
    var environment: [String: String] = [:]
    var disableTransparentHugePages = false
    /// More `clone` options, e.g. `--nic ... --disk ...`.
    var arguments: [String] = []

    enum CodingKeys: String, CodingKey {
        case tcgTranslationCacheMiB = "tcg_tb_size_mib"
        case environment, arguments
        case disableTransparentHugePages = "thp_disabled"
    }
}

enum CLI {
    private static func cloneArguments(_ workspace: Workspace, _ settings: CloneSettings) -> [String] {
        var arguments = ["clone", workspace.template.value, "--store", workspace.store.root, "--json"]
        if let size = settings.tcgTranslationCacheMiB { arguments += ["--tcg-tb-size", String(size)] }
        return arguments + settings.arguments
    }

    private static func spawnClone(_ workspace: Workspace, _ settings: CloneSettings, binary: String? = nil) throws -> ChildProcess {
        let base = "\(workspace.scratch)/cli-\(UUID().uuidString.prefix(8))"
        return try ChildProcess.spawn(binary ?? workspace.vmtemplate, cloneArguments(workspace, settings), environment: settings.environment, transparentHugePages: !settings.disableTransparentHugePages, outputBase: base)
    }

    private static func finish(_ child: ChildProcess, status: Int32) throws -> CLIClone {
        defer { child.removeOutput() }
        guard status == 0 else {
            throw BenchError("vmtemplate clone failed (wait status \(status)): \(child.stderr.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        do {
            return try JSONDecoder().decode(CLIClone.self, from: Data(child.stdout.utf8))
        } catch {
            throw BenchError("vmtemplate clone printed no clone JSON: \(child.stdout) \(child.stderr)")
        }
    }

    /// `vmtemplate clone TEMPLATE --store S --json`, from spawn until it exited (the guest runs).
    /// `binary` replaces the workspace's vmtemplate (e.g. a build with the Swift runtime linked
    /// statically), to compare the two in one run.
    static func clone(_ workspace: Workspace, _ settings: CloneSettings = CloneSettings(), binary: String? = nil) async throws -> (seconds: Double, clone: CLIClone) {
        let child = try spawnClone(workspace, settings, binary: binary)
        let (status, ended) = try await child.wait()
        let clone = try finish(child, status: status)
        return (child.started.duration(to: ended).seconds, clone)
    }

    /// `count` CLI clones started at once: from the first spawn until the last one returned.
    static func concurrentClones(_ workspace: Workspace, count: Int, _ settings: CloneSettings = CloneSettings()) async throws -> (seconds: Double, clones: [CLIClone]) {
        var children: [ChildProcess] = []
        for _ in 0..<count { children.append(try spawnClone(workspace, settings)) }
        guard let firstStart = children.first?.started else { return (.nan, []) }
        let results = try await withThrowingTaskGroup(of: (Int32, ContinuousClock.Instant, ChildProcess).self) { group in
            for child in children { group.addTask { let (status, ended) = try await child.wait(); return (status, ended, child) } }
            var all: [(Int32, ContinuousClock.Instant, ChildProcess)] = []
            for try await result in group { all.append(result) }
            return all
        }
        var clones: [CLIClone] = []
        var failures: [String] = []
        for (status, _, child) in results {
            do { clones.append(try finish(child, status: status)) } catch { failures.append("\(error)") }
        }
        guard failures.isEmpty else {
            try? await remove(workspace, clones)
            throw BenchError("\(failures.count) of \(count) concurrent clones failed: \(failures[0])")
        }
        guard let last = results.map(\.1).max() else { return (.nan, clones) }
        return (firstStart.duration(to: last).seconds, clones)
    }

    /// What `executable arguments` printed on stdout; it must succeed.
    static func output(_ workspace: Workspace, _ executable: String, _ arguments: [String]) async throws -> String {
        try await run(workspace, executable, arguments).stdout
    }

    /// How long `executable arguments` takes, from spawn to exit; it must succeed.
    static func timed(_ workspace: Workspace, _ executable: String, _ arguments: [String]) async throws -> Double {
        try await run(workspace, executable, arguments).seconds
    }

    private static func run(_ workspace: Workspace, _ executable: String, _ arguments: [String]) async throws -> (seconds: Double, stdout: String) {
        let child = try ChildProcess.spawn(executable, arguments, outputBase: "\(workspace.scratch)/t-\(UUID().uuidString.prefix(8))")
        let (status, ended) = try await child.wait()
        defer { child.removeOutput() }
        guard status == 0 else { throw BenchError("\(executable) \(arguments.prefix(2)) failed: \(child.stderr)") }
        return (child.started.duration(to: ended).seconds, child.stdout)
    }

    /// `list --json` against `cat` of the same clones' smaps, `runs` each, interleaved (which goes
    /// first alternates, so neither always runs on a warmer cache).
    static func listAgainstCat(_ workspace: Workspace, pids: [Int32], runs: Int) async throws -> (list: Summary, cat: Summary) {
        var listSamples: [Double] = []
        var catSamples: [Double] = []
        let catCommand = "cat " + pids.map { "/proc/\($0)/smaps" }.joined(separator: " ") + " > /dev/null"
        for run in 0..<runs {
            for isList in run % 2 == 0 ? [true, false] : [false, true] {
                if isList {
                    listSamples.append(try await timed(workspace, workspace.vmtemplate, ["list", "--json", "--store", workspace.store.root]))
                } else {
                    catSamples.append(try await timed(workspace, "/bin/sh", ["-c", catCommand]))
                }
            }
        }
        return (Summary(listSamples), Summary(catSamples))
    }

    /// `vmtemplate rm ID... --grace 1` (not timed).
    static func remove(_ workspace: Workspace, _ clones: [CLIClone]) async throws {
        guard !clones.isEmpty else { return }
        let base = "\(workspace.scratch)/rm-\(UUID().uuidString.prefix(8))"
        let child = try ChildProcess.spawn(workspace.vmtemplate, ["rm"] + clones.map(\.id) + ["--store", workspace.store.root, "--grace", "1"], outputBase: base)
        let (status, _) = try await child.wait()
        defer { child.removeOutput() }
        guard status == 0 else { throw BenchError("vmtemplate rm failed: \(child.stderr)") }
    }
}

// MARK: - Guest control channel

extension ControlChannel {
    /// One request on the library's control channel, timed from the connect to the whole reply
    /// line, on a thread of its own; the reply must start with `prefix`.
    static func request(_ line: String, socket path: String, expecting prefix: String, timeout: Duration = .seconds(300)) async throws -> (reply: String, seconds: Double) {
        try await onOwnThread {
            let sent = ContinuousClock.now
            let reply = try ControlChannel(path: path).request(line, timeout: timeout)
            let seconds = sent.duration(to: .now).seconds
            guard reply.hasPrefix(prefix) else { throw BenchError("guest answered '\(reply)' to '\(line)'") }
            return (reply, seconds)
        }
    }
}
