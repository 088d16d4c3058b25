import ArgumentParser
import Foundation
import VMTemplateAPI
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

/// Warm pools and the API against fresh clones, interleaved in one run (docs/benchmarks.md,
/// "Warm pools and the API").
struct PoolBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pool",
        abstract: "Hand-outs from a warm pool (CLI and API) against fresh clones (CLI, API, in-process); time to the guest's first answer; concurrency; a pooled member's memory; refill rate and a running clone's latency while a pool refills."
    )

    @OptionGroup var common: CommonOptions

    @Option(help: "Interleaved runs of each way of getting a clone.")
    var runs = 10

    @Option(help: "Pool size, and clones started at once in the concurrency runs.")
    var concurrency = 16

    @Option(help: "Seconds an idle clone runs before its memory is read.")
    var idleSeconds = 5

    struct Results: Codable {
        var host: HostFacts
        var freshCLI: Summary
        var freshCLIFirstAnswer: Summary
        var poolCLI: Summary
        var poolCLIFirstAnswer: Summary
        var poolAPI: Summary
        var poolAPIFirstAnswer: Summary
        var freshAPI: Summary
        var inProcess: Summary
        /// `vmtemplate explain ...`: a CLI process that does no store work: the floor of any CLI
        /// command.
        var cliStart: Summary
        var concurrentPool: Summary
        var concurrentFresh: Summary
        var pooledMemberOwnBytes: Double
        var idleCloneOwnBytes: Double
        var refillSeconds: Double
        var pingIdle: Summary
        var pingWhileRefilling: Summary
        var targets: [Target]
    }

    func run() async throws {
        try await benchmarking {
            let log = Log()
            let workspace = try await Workspace.prepare(common.workspaceOptions, log: log)
            let root = workspace.store.root
            let template = workspace.template.value
            let server = try ChildProcess.spawn(workspace.vmtemplate, ["serve", "--store", root, "--fill-pause", "0"], outputBase: "\(workspace.scratch)/serve")
            defer { kill(server.pid, SIGTERM) }
            let client = APIClient(socketPath: "\(root)/serve.sock")
            func call(_ method: String, _ path: String, _ body: String? = nil) async throws -> UnixHTTPClient.Reply {
                try await client.call(method, path, body)
            }
            func ready() async -> Int { await client.ready(template) }
            func waitForPool(_ size: Int) async throws { try await client.waitForPool(template, ready: size) }
            func firstAnswer(_ socket: String) async throws -> ContinuousClock.Instant {
                _ = try await ControlChannel.request("ping", socket: socket, expecting: "pong")
                return .now
            }
            func apiClone(fromPool: Bool) async throws -> (seconds: Double, clone: CloneView, started: ContinuousClock.Instant) {
                let started = ContinuousClock.now
                let (seconds, clone) = try await client.create(template, fromPool: fromPool)
                return (seconds, clone, started)
            }
            func removeAPI(_ id: String) async throws { _ = try await call("DELETE", "/v1/clones/\(id)") }
            try await client.waitUntilUp(server: server)

            log.note("filling a pool of \(concurrency)")
            let fillStarted = ContinuousClock.now
            try await client.setPool(template, size: concurrency)
            try await waitForPool(concurrency)
            let refillSeconds = fillStarted.duration(to: .now).seconds

            log.note("warm-up")
            let warmFresh = try await CLI.clone(workspace, CloneSettings(arguments: ["--no-pool"]))
            try await CLI.remove(workspace, [warmFresh.clone])
            let warmPool = try await CLI.clone(workspace)
            try await CLI.remove(workspace, [warmPool.clone])
            try await waitForPool(concurrency)

            var freshCLI: [Double] = [], freshCLIFirst: [Double] = []
            var poolCLI: [Double] = [], poolCLIFirst: [Double] = []
            var poolAPI: [Double] = [], poolAPIFirst: [Double] = []
            var freshAPI: [Double] = [], inProcess: [Double] = [], cliStart: [Double] = []
            let engine = CloneEngine(store: try TemplateStore(root: root))
            for run in 0..<runs {
                log.note("run \(run + 1)/\(runs)")
                for step in 0..<6 {
                    try await waitForPool(concurrency)
                    switch (step + run) % 6 {
                    case 5:
                        let child = try ChildProcess.spawn(workspace.vmtemplate, ["explain", "share=off,readonly=on,rom=off"], outputBase: "\(workspace.scratch)/explain")
                        let (_, ended) = try await child.wait()
                        cliStart.append(child.started.duration(to: ended).seconds)
                        child.removeOutput()
                    case 0:
                        let (seconds, clone) = try await CLI.clone(workspace, CloneSettings(arguments: ["--no-pool"]))
                        let started = ContinuousClock.now - .seconds(seconds)
                        freshCLI.append(seconds)
                        freshCLIFirst.append(started.duration(to: try await firstAnswer(clone.controlSocket)).seconds)
                        try await CLI.remove(workspace, [clone])
                    case 1:
                        let (seconds, clone) = try await CLI.clone(workspace)
                        let started = ContinuousClock.now - .seconds(seconds)
                        poolCLI.append(seconds)
                        poolCLIFirst.append(started.duration(to: try await firstAnswer(clone.controlSocket)).seconds)
                        try await CLI.remove(workspace, [clone])
                    case 2:
                        let (seconds, clone, started) = try await apiClone(fromPool: true)
                        guard clone.fromPool else { throw BenchError("the API clone did not come from the pool") }
                        poolAPI.append(seconds)
                        poolAPIFirst.append(started.duration(to: try await firstAnswer(clone.controlSocket)).seconds)
                        try await removeAPI(clone.id)
                    case 3:
                        let (seconds, clone, _) = try await apiClone(fromPool: false)
                        freshAPI.append(seconds)
                        try await removeAPI(clone.id)
                    default:
                        var request = CloneRequest(template: workspace.template)
                        request.usePool = false
                        let started = ContinuousClock.now
                        let record = try await engine.clone(request).record
                        inProcess.append(started.duration(to: .now).seconds)
                        try await CloneLifecycle(store: engine.store).remove(record)
                    }
                }
            }

            log.note("\(concurrency) at once, from the pool and fresh")
            var concurrentPool: [Double] = [], concurrentFresh: [Double] = []
            for run in 0..<2 {
                for step in 0..<2 {
                    try await waitForPool(concurrency)
                    let fromPool = (step + run) % 2 == 0
                    let (seconds, clones) = try await CLI.concurrentClones(workspace, count: concurrency, CloneSettings(arguments: fromPool ? [] : ["--no-pool"]))
                    if fromPool { concurrentPool.append(seconds) } else { concurrentFresh.append(seconds) }
                    try await CLI.remove(workspace, clones)
                }
            }

            log.note("memory: a pooled member and a clone idle for \(idleSeconds) s")
            try await waitForPool(concurrency)
            let store = try TemplateStore(root: root)
            guard let member = store.clones().records.first(where: { $0.state == .pooled }), let memberPID = member.qemu?.pid else { throw BenchError("no pooled member to measure") }
            let idle = try await CLI.clone(workspace, CloneSettings(arguments: ["--no-pool"])).clone
            _ = try await firstAnswer(idle.controlSocket)
            try await Task.sleep(for: .seconds(idleSeconds))
            guard let idlePID = idle.pid else { throw BenchError("no pid") }
            let memberMemory = try MemoryReport.clone(pid: memberPID, templateFile: workspace.memoryFile)
            let idleMemory = try MemoryReport.clone(pid: idlePID, templateFile: workspace.memoryFile)

            log.note("a running clone's ping, idle host and while the pool refills")
            var pingIdle: [Double] = [], pingRefilling: [Double] = []
            for _ in 0..<20 { pingIdle.append(try await ControlChannel.request("ping", socket: idle.controlSocket, expecting: "pong").seconds) }
            _ = try await call("PUT", "/v1/pools/\(template)", #"{"size": 0}"#)
            _ = try await call("PUT", "/v1/pools/\(template)", #"{"size": \#(concurrency)}"#)
            while await ready() < concurrency {
                pingRefilling.append(try await ControlChannel.request("ping", socket: idle.controlSocket, expecting: "pong").seconds)
            }
            try await CLI.remove(workspace, [idle])
            _ = try await call("PUT", "/v1/pools/\(template)", #"{"size": 0}"#)

            let fresh = Summary(freshCLI).median
            func ratio(_ a: Double, _ b: Double) -> Double { a / b }
            let targets = [
                Target(name: "time to first answer: pool (CLI) vs fresh (CLI)", measured: Format.ratio(ratio(Summary(poolCLIFirst).median, Summary(freshCLIFirst).median)) + " (\(Format.milliseconds(Summary(poolCLIFirst).median)) vs \(Format.milliseconds(Summary(freshCLIFirst).median)))", limit: "<= 0.15×", pass: ratio(Summary(poolCLIFirst).median, Summary(freshCLIFirst).median) <= 0.15),
                Target(name: "hand-out through the CLI vs fresh CLI clone", measured: Format.ratio(ratio(Summary(poolCLI).median, fresh)) + " (\(Format.milliseconds(Summary(poolCLI).median)) vs \(Format.milliseconds(fresh)))", limit: "<= 0.15×", pass: ratio(Summary(poolCLI).median, fresh) <= 0.15),
                Target(name: "(for information) the CLI's own start (explain) vs fresh CLI clone: the floor of a CLI hand-out", measured: Format.ratio(ratio(Summary(cliStart).median, fresh)) + " (\(Format.milliseconds(Summary(cliStart).median)))", limit: "<= 0.15×", pass: ratio(Summary(cliStart).median, fresh) <= 0.15),
                Target(name: "hand-out through the API vs fresh CLI clone", measured: Format.ratio(ratio(Summary(poolAPI).median, fresh)) + " (\(Format.milliseconds(Summary(poolAPI).median)))", limit: "<= 0.05×", pass: ratio(Summary(poolAPI).median, fresh) <= 0.05),
                Target(name: "fresh CLI clone vs in-process restore", measured: Format.ratio(ratio(fresh, Summary(inProcess).median)) + " (\(Format.milliseconds(fresh)) vs \(Format.milliseconds(Summary(inProcess).median)))", limit: "<= 1.25×", pass: ratio(fresh, Summary(inProcess).median) <= 1.25),
                Target(name: "fresh API clone vs in-process restore", measured: Format.ratio(ratio(Summary(freshAPI).median, Summary(inProcess).median)) + " (\(Format.milliseconds(Summary(freshAPI).median)))", limit: "<= 1.1×", pass: ratio(Summary(freshAPI).median, Summary(inProcess).median) <= 1.1),
                Target(name: "\(concurrency) concurrent hand-outs vs \(concurrency) concurrent fresh clones", measured: Format.ratio(ratio(Summary(concurrentPool).median, Summary(concurrentFresh).median)) + " (\(Format.milliseconds(Summary(concurrentPool).median)) vs \(Format.milliseconds(Summary(concurrentFresh).median)))", limit: "<= 0.25×", pass: ratio(Summary(concurrentPool).median, Summary(concurrentFresh).median) <= 0.25),
                Target(name: "a pooled member's own memory vs an idle running clone's", measured: "\(Format.mebibytes(memberMemory.qemuOwnBytes)) vs \(Format.mebibytes(idleMemory.qemuOwnBytes))", limit: "<=", pass: memberMemory.qemuOwnBytes <= idleMemory.qemuOwnBytes),
            ]
            let results = Results(host: workspace.host, freshCLI: Summary(freshCLI), freshCLIFirstAnswer: Summary(freshCLIFirst), poolCLI: Summary(poolCLI), poolCLIFirstAnswer: Summary(poolCLIFirst), poolAPI: Summary(poolAPI), poolAPIFirstAnswer: Summary(poolAPIFirst), freshAPI: Summary(freshAPI), inProcess: Summary(inProcess), cliStart: Summary(cliStart), concurrentPool: Summary(concurrentPool), concurrentFresh: Summary(concurrentFresh), pooledMemberOwnBytes: memberMemory.qemuOwnBytes, idleCloneOwnBytes: idleMemory.qemuOwnBytes, refillSeconds: refillSeconds, pingIdle: Summary(pingIdle), pingWhileRefilling: Summary(pingRefilling), targets: targets)
            if common.json { return try printJSON(results) }
            let row = Summary.tableRow
            let h = results.host
            print("""
                \(h.date), \(h.cores) cores, Linux \(h.kernel), \(h.qemu), TCG, load \(h.loadAverage) -> \(HostFacts.loadAverage)

                \(Format.table(["", "runs", "median", "min", "max"], [
                    row("fresh clone, CLI (until it returns)", results.freshCLI),
                    row("  until the guest answers ping", results.freshCLIFirstAnswer),
                    row("pool hand-out, CLI", results.poolCLI),
                    row("  until the guest answers ping", results.poolCLIFirstAnswer),
                    row("pool hand-out, API (POST until 201)", results.poolAPI),
                    row("  until the guest answers ping", results.poolAPIFirstAnswer),
                    row("fresh clone, API", results.freshAPI),
                    row("fresh clone in-process (CloneEngine.clone)", results.inProcess),
                    row("CLI process that does no store work (explain)", results.cliStart),
                    row("\(concurrency) hand-outs at once (CLI, until the last)", results.concurrentPool),
                    row("\(concurrency) fresh clones at once (CLI, until the last)", results.concurrentFresh),
                    row("ping to a running clone, idle host", results.pingIdle),
                    row("  the same while a pool of \(concurrency) refills", results.pingWhileRefilling),
                ]))

                filling a pool of \(concurrency) from empty: \(String(format: "%.2f", refillSeconds)) s (\(String(format: "%.1f", Double(concurrency) / refillSeconds)) members/s)
                QEMU's own memory: pooled member \(Format.mebibytes(memberMemory.qemuOwnBytes)), idle running clone \(Format.mebibytes(idleMemory.qemuOwnBytes)) (after \(idleSeconds) s)

                \(targets.map(\.line).joined(separator: "\n"))
                """)
        }
    }
}
