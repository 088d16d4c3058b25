import ArgumentParser
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

/// Where a CLI clone's time goes, without strace (which slows QEMU's many system calls so much
/// that the proportions are wrong).
struct ProfileBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "profile",
        abstract: "Break a clone's start-up into phases: CLI process, engine, and each QEMU/QMP step.",
        discussion: """
            Interleaves, per run: the floor; the CLI clone; 'vmtemplate list' on an empty store (the \
            cost of the CLI process alone: exec, Swift runtime, Foundation, arguments, store open); \
            CloneEngine.clone called in this process (the library's whole path, no process start); \
            and the restore steps replayed one by one with the library's QMPClient and timed \
            (spawn, QMP connect + greeting + qmp_capabilities, migrate-set-capabilities, \
            migrate-incoming, wait for completion, cont), then one more QMP round trip for scale.
            """
    )

    @OptionGroup var common: CommonOptions

    @Option(help: "Runs of each measurement.")
    var runs = 10

    @Option(help: "Clones started at once in the concurrent part (0 skips it).")
    var concurrency = 16

    @Option(help: "Repetitions of the concurrent part.")
    var concurrentRuns = 3

    struct Phases: Codable {
        var floor: Summary
        var cli: Summary
        var cliProcessOnly: Summary
        var engineInProcess: Summary
        var steps: [Step]
        /// The same start-up with a plain blocking socket instead of QMPClient.connect.
        var connectSteps: [Step]
        /// What `Task.sleep(for: .milliseconds(1))` (QMPClient's retry interval) really sleeps here.
        var taskSleepOneMillisecond: Summary
        /// Wall time until the last of `concurrency` started at once, per kind.
        var concurrent: [Step]

        struct Step: Codable {
            var name: String
            var summary: Summary
        }

        enum CodingKeys: String, CodingKey {
            case floor, cli
            case cliProcessOnly = "cli_process_only"
            case engineInProcess = "engine_in_process"
            case steps
            case connectSteps = "connect_steps"
            case taskSleepOneMillisecond = "task_sleep_1ms"
            case concurrent
        }
    }

    private static let stepNames = [
        "QEMUInstance.launch (fork/exec call)",
        "spawn until QMP ready (connect, greeting, qmp_capabilities)",
        "migrate-set-capabilities",
        "add-fd + migrate-incoming (reply)",
        "wait for migration completed",
        "cont",
        "one more QMP round trip (query-status, guest running)",
    ]

    private static let connectStepNames = [
        "spawn until connect() accepted (pre-bound listener: at once)",
        "accepted until greeting line",
        "qmp_capabilities round trip",
    ]

    func run() async throws {
        try await benchmarking {
            let log = Log()
            let workspace = try await Workspace.prepare(common.workspaceOptions, log: log)
            let emptyStore = "\(workspace.scratch)/empty-store"
            let engine = CloneEngine(store: workspace.store)
            var floors: [Double] = []
            var clis: [Double] = []
            var processOnly: [Double] = []
            var engineTimes: [Double] = []
            var steps = Array(repeating: [Double](), count: Self.stepNames.count)
            var connectSteps = Array(repeating: [Double](), count: Self.connectStepNames.count)
            var sleeps: [Double] = []
            for _ in 0..<50 {
                let before = ContinuousClock.now
                try await Task.sleep(for: .milliseconds(1))
                sleeps.append(before.duration(to: .now).seconds)
            }
            for run in 0...runs {
                // Run 0 is the warm-up.
                if run > 0 { log.note("run \(run)/\(runs)") }
                let floor = try await Runners.floor(workspace)
                let (cli, clone) = try await CLI.clone(workspace)
                try await CLI.remove(workspace, [clone])
                let list = try await Self.timeCLI(workspace, ["list", "--json", "--store", emptyStore])
                let engineStarted = ContinuousClock.now
                let (record, _, _) = try await engine.clone(CloneRequest(template: workspace.template))
                let engineSeconds = engineStarted.duration(to: .now).seconds
                try await CloneLifecycle(store: engine.store).remove(record, grace: .seconds(1))
                let replay = try await Self.replay(workspace)
                let connect = try await Self.replayConnect(workspace)
                guard run > 0 else { continue }
                for index in connectSteps.indices { connectSteps[index].append(connect[index]) }
                floors.append(floor.greeting)
                clis.append(cli)
                processOnly.append(list)
                engineTimes.append(engineSeconds)
                for index in steps.indices { steps[index].append(replay[index]) }
            }
            let phases = Phases(
                floor: Summary(floors), cli: Summary(clis), cliProcessOnly: Summary(processOnly), engineInProcess: Summary(engineTimes),
                steps: zip(Self.stepNames, steps).map { Phases.Step(name: $0.0, summary: Summary($0.1)) },
                connectSteps: zip(Self.connectStepNames, connectSteps).map { Phases.Step(name: $0.0, summary: Summary($0.1)) },
                taskSleepOneMillisecond: Summary(sleeps),
                concurrent: try await concurrentPart(workspace, emptyStore: emptyStore, log: log)
            )
            if common.json {
                try printJSON(phases)
            } else {
                print(render(phases, host: workspace.host))
            }
        }
    }

    private static func timeCLI(_ workspace: Workspace, _ arguments: [String]) async throws -> Double {
        let child = try ChildProcess.spawn(workspace.vmtemplate, arguments, outputBase: "\(workspace.scratch)/cli-\(UUID().uuidString.prefix(8))")
        let (status, ended) = try await child.wait()
        defer { child.removeOutput() }
        guard status == 0 else { throw BenchError("vmtemplate \(arguments.joined(separator: " ")) failed: \(child.stderr)") }
        return child.started.duration(to: ended).seconds
    }

    /// The launcher.s restore, step by step, on the same command line.
    private static func replay(_ workspace: Workspace) async throws -> [Double] {
        var marks: [ContinuousClock.Instant] = []
        let (vm, started) = try BenchVM.spawn(workspace) { try workspace.cloneArguments(paths: $0) }
        marks.append(started)
        marks.append(.now)
        do {
            let process = vm.qemu
            let qmp = try await QMPClient.connect(socketPath: vm.paths.qmpSocket, timeout: .seconds(60), isPeerAlive: { process.isRunning })
            defer { qmp.close() }
            marks.append(.now)
            try await qmp.migrateSetCapabilities(["x-ignore-shared": true, "events": true])
            marks.append(.now)
            // As the launcher does: the state goes to QEMU as a descriptor (a sandboxed QEMU need
            // not reach the file by path).
            if workspace.manifest.migration.transport == .file {
                let state = open(workspace.stateFile, O_RDONLY | O_CLOEXEC)
                guard state >= 0 else { throw BenchError("open \(workspace.stateFile): \(String(cString: strerror(errno)))") }
                defer { close(state) }
                _ = try await qmp.addFD(state, fdset: CloneLauncher.stateFDSet)
                try await qmp.migrateIncoming(uri: "file:/dev/fdset/\(CloneLauncher.stateFDSet)")
            } else {
                try await qmp.migrateIncoming(uri: workspace.manifest.migration.transport.loadURI(from: workspace.stateFile))
            }
            marks.append(.now)
            _ = try await qmp.waitForMigration(timeout: .seconds(60))
            marks.append(.now)
            try await qmp.cont()
            marks.append(.now)
            _ = try await qmp.queryStatus()
            marks.append(.now)
        } catch {
            await vm.stop()
            throw vm.failure("replayed restore", error)
        }
        await vm.stop()
        return zip(marks, marks.dropFirst()).map { $0.0.duration(to: $0.1).seconds }
    }

    /// What slows clones started together: the CLI processes themselves, the restore, and the
    /// restored guests running (TCG) while later clones start.
    private func concurrentPart(_ workspace: Workspace, emptyStore: String, log: Log) async throws -> [Phases.Step] {
        guard concurrency > 0 else { return [] }
        let names = [
            "\(concurrency) floors (-S until QMP greeting)",
            "\(concurrency) floors until first QMP reply",
            "\(concurrency) `vmtemplate list` on an empty store (CLI processes only)",
            "\(concurrency) replayed restores, guests left paused (-S, no cont)",
            "\(concurrency) replayed restores, guests running",
            "\(concurrency) CloneEngine.clone in this process (no CLI processes)",
            "\(concurrency) vmtemplate clone (CLI)",
        ]
        var samples = Array(repeating: [Double](), count: names.count)
        let count = concurrency
        for run in 0..<concurrentRuns {
            log.note("concurrent \(run + 1)/\(concurrentRuns)")
            let floors = try await Runners.concurrentFloors(workspace, count: count)
            samples[0].append(floors.greeting)
            samples[1].append(floors.firstReply)
            samples[2].append(try await Self.timed {
                try await withThrowingTaskGroup(of: Double.self) { group in
                    for _ in 0..<count { group.addTask { try await Self.timeCLI(workspace, ["list", "--json", "--store", emptyStore]) } }
                    try await group.waitForAll()
                }
            })
            for (index, paused) in [(3, true), (4, false)] {
                var vms: [BenchVM] = []
                samples[index].append(try await Self.timed {
                    try await withThrowingTaskGroup(of: BenchVM.self) { group in
                        for _ in 0..<count { group.addTask { try await Self.restore(workspace, paused: paused) } }
                        for try await vm in group { vms.append(vm) }
                    }
                })
                for vm in vms { await vm.stop() }
            }
            let engine = CloneEngine(store: workspace.store)
            var records: [CloneRecord] = []
            samples[5].append(try await Self.timed {
                try await withThrowingTaskGroup(of: CloneRecord.self) { group in
                    for _ in 0..<count { group.addTask { try await engine.clone(CloneRequest(template: workspace.template)).record } }
                    for try await record in group { records.append(record) }
                }
            })
            for record in records { try await CloneLifecycle(store: engine.store).remove(record, grace: .seconds(1)) }
            let (seconds, clones) = try await CLI.concurrentClones(workspace, count: count)
            samples[6].append(seconds)
            try await CLI.remove(workspace, clones)
        }
        return zip(names, samples).map { Phases.Step(name: $0.0, summary: Summary($0.1)) }
    }

    private static func timed(_ body: () async throws -> Void) async throws -> Double {
        let started = ContinuousClock.now
        try await body()
        return started.duration(to: .now).seconds
    }

    /// The launcher's own restore in one go; with `paused`, QEMU gets `-S` so the guest stays
    /// stopped after the state is loaded (no TCG work competing with other start-ups).
    private static func restore(_ workspace: Workspace, paused: Bool) async throws -> BenchVM {
        let (vm, _) = try BenchVM.spawn(workspace) { try workspace.cloneArguments(paths: $0) + (paused ? ["-S"] : []) }
        do {
            let (qmp, loaded) = try await CloneLauncher(store: workspace.store).restore(workspace.published, into: vm.qemu, cloneID: Workspace.benchQEMUName, timeout: .seconds(60))
            defer { qmp.close() }
            try await loaded()
            if !paused { try await qmp.cont() }
            return vm
        } catch {
            await vm.stop()
            throw vm.failure("replayed restore", error)
        }
    }

    /// Spawn, connect, greeting and qmp_capabilities on a plain blocking socket.
    private static func replayConnect(_ workspace: Workspace) async throws -> [Double] {
        let (vm, started) = try BenchVM.spawn(workspace) { try workspace.cloneArguments(paths: $0) }
        let process = vm.qemu
        let socketPath = vm.paths.qmpSocket
        do {
            let marks = try await onOwnThread { () -> [ContinuousClock.Instant] in
                let deadline = started + .seconds(60)
                let socket = try LineSocket.connect(path: socketPath, deadline: deadline, isAlive: { process.isRunning })
                let accepted = ContinuousClock.now
                _ = try socket.readLine(deadline: deadline)
                let greeted = ContinuousClock.now
                try socket.writeLine(#"{"execute":"qmp_capabilities"}"#)
                _ = try socket.readLine(deadline: deadline)
                return [started, accepted, greeted, .now]
            }
            await vm.stop()
            return zip(marks, marks.dropFirst()).map { $0.0.duration(to: $0.1).seconds }
        } catch {
            await vm.stop()
            throw vm.failure("replayed connect", error)
        }
    }

    private func render(_ p: Phases, host: HostFacts) -> String {
        func row(_ name: String, _ s: Summary) -> [String] {
            [name, Format.milliseconds(s.median), Format.milliseconds(s.min), Format.milliseconds(s.max)]
        }
        let stepTotal = p.steps.dropLast().map(\.summary.median).reduce(0, +)
        let whole = Format.table(["whole", "median", "min", "max"], [
            row("floor (-S until QMP greeting)", p.floor),
            row("vmtemplate clone (CLI)", p.cli),
            row("CloneEngine.clone in process", p.engineInProcess),
            row("vmtemplate list on an empty store (CLI process cost)", p.cliProcessOnly),
        ])
        let stepsTable = Format.table(["replayed restore step", "median", "min", "max"], p.steps.map { row($0.name, $0.summary) })
        let concurrentTable = Format.table(["started at once, until the last", "median", "min", "max"], p.concurrent.map { row($0.name, $0.summary) })
        let connectTable = Format.table(["the same start-up on a plain blocking socket", "median", "min", "max"], p.connectSteps.map { row($0.name, $0.summary) } + [row("Task.sleep(for: .milliseconds(1)), as slept", p.taskSleepOneMillisecond)])
        return """
            \(host.date), \(host.cores) cores, \(host.qemu), TCG, load \(host.loadAverage)

            \(whole)

            \(stepsTable)

            \(connectTable)

            \(concurrentTable)

            sum of the replayed steps up to cont: \(Format.milliseconds(stepTotal)); CLI minus engine: \(Format.milliseconds(p.cli.median - p.engineInProcess.median)); engine minus replayed steps (store, records, checks): \(Format.milliseconds(p.engineInProcess.median - stepTotal))
            """
    }
}
