import ArgumentParser
import Foundation
import VMTemplateAPI
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The clone path against what QEMU costs, side by side in one run (issue 18; docs/benchmarks.md,
/// "The clone path's own cost"): the floor is the product's own launch, through its package seams
/// (the clone's command line from `CloneLauncher.commandLine`, sandbox included, and its restore),
/// without any store work.
struct TargetsBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "targets",
        abstract: "A fresh CLI clone against a tuned in-process restore of its own command line; CLI and API hand-outs against the CLI's own start; per-phase timings; burst fan-out of API creates, fresh and from a pool.",
        discussion: """
            Interleaved, per run: the floor (CloneLauncher's command line and restore, in this \
            process, no store work), 'vmtemplate clone --no-pool', 'vmtemplate --version', a CLI \
            hand-out and an API hand-out from a pool kept full by 'vmtemplate serve'. Then --burst \
            API creates at once, fresh and from a pool of --burst, against one create alone.
            """
    )

    @OptionGroup var common: CommonOptions

    @Option(help: "Interleaved runs of each measurement.")
    var runs = 15

    @Option(help: "API creates sent at once in the fan-out runs (and the pool size for them).")
    var burst = 20

    @Option(help: "Fan-out runs of each kind.")
    var burstRuns = 3

    @Option(name: .customLong("also-vmtemplate"), help: ArgumentHelp("Another vmtemplate binary (the commit before a change) whose fresh clone and CLI hand-out are timed in the same interleave.", valueName: "path"))
    var otherBinary: String?

    struct Phases: Codable {
        var admission: Summary, spawn: Summary, restore: Summary, devices: Summary, resume: Summary, records: Summary, total: Summary
    }

    struct Burst: Codable {
        /// Clones per second: `burst` over the time until the last answer.
        var clonesPerSecond: Double
        var p50: Double
        var p95: Double
        var wall: Double
    }

    struct Results: Codable {
        var host: HostFacts
        var floor: Summary
        var freshCLI: Summary
        var freshCLIPhases: Phases
        var version: Summary
        var poolCLI: Summary
        var poolAPI: Summary
        var otherFreshCLI: Summary?
        var otherPoolCLI: Summary?
        var oneFreshAPI: Summary
        var onePoolAPI: Summary
        var burstFresh: [Burst]
        var burstPool: [Burst]
        var targets: [Target]
    }

    func run() async throws {
        try await benchmarking {
            let log = Log()
            let workspace = try await Workspace.prepare(common.workspaceOptions, log: log)
            let root = workspace.store.root
            let template = workspace.template.value
            let published = try workspace.store.template(named: workspace.template)
            // The floor's QEMUs live in a store of their own in the scratch directory: the
            // launcher names their paths, but nothing of the benchmark's store is touched.
            let floorStore = try TemplateStore(root: "\(workspace.scratch)/floor-store")
            let floorLauncher = CloneLauncher(store: floorStore, templates: workspace.store)

            let server = try ChildProcess.spawn(workspace.vmtemplate, ["serve", "--store", root, "--fill-pause", "0"], outputBase: "\(workspace.scratch)/serve")
            defer { kill(server.pid, SIGTERM) }
            let api = APIClient(socketPath: "\(root)/serve.sock")
            try await api.waitUntilUp(server: server)
            try await api.setPool(template, size: 1)
            try await api.waitForPool(template, ready: 1)

            log.note("warm-up")
            _ = try await floor(floorLauncher, published)
            let warm = try await CLI.clone(workspace, CloneSettings(arguments: ["--no-pool"]))
            try await CLI.remove(workspace, [warm.clone])

            var floors: [Double] = [], fresh: [Double] = [], versions: [Double] = [], poolCLI: [Double] = [], poolAPI: [Double] = []
            var phases: [CloneTimings] = []
            var otherFresh: [Double] = [], otherPool: [Double] = []
            let steps = otherBinary == nil ? 5 : 7
            for run in 0..<runs {
                log.note("run \(run + 1)/\(runs)")
                for step in 0..<steps {
                    try await api.waitForPool(template, ready: 1)
                    switch (step + run) % steps {
                    case 5:
                        let (seconds, clone) = try await CLI.clone(workspace, CloneSettings(arguments: ["--no-pool"]), binary: otherBinary)
                        otherFresh.append(seconds)
                        try await CLI.remove(workspace, [clone])
                    case 6:
                        let (seconds, clone) = try await CLI.clone(workspace, binary: otherBinary)
                        otherPool.append(seconds)
                        try await CLI.remove(workspace, [clone])
                    case 0:
                        floors.append(try await floor(floorLauncher, published))
                    case 1:
                        let child = try ChildProcess.spawn(workspace.vmtemplate, ["clone", template, "--store", root, "--json", "--no-pool"], outputBase: "\(workspace.scratch)/clone")
                        let (status, ended) = try await child.wait()
                        guard status == 0 else { throw BenchError("vmtemplate clone exited \(status): \(child.stderr)") }
                        fresh.append(child.started.duration(to: ended).seconds)
                        let view = try JSONCoding.decoder().decode(CloneView.self, from: Data(child.stdout.utf8))
                        if let timings = view.timings { phases.append(timings) }
                        child.removeOutput()
                        _ = try await api.call("DELETE", "/v1/clones/\(view.id)")
                    case 2:
                        let child = try ChildProcess.spawn(workspace.vmtemplate, ["--version"], outputBase: "\(workspace.scratch)/version")
                        let (_, ended) = try await child.wait()
                        versions.append(child.started.duration(to: ended).seconds)
                        child.removeOutput()
                    case 3:
                        let (seconds, clone) = try await CLI.clone(workspace)
                        poolCLI.append(seconds)
                        try await CLI.remove(workspace, [clone])
                    default:
                        let (seconds, view) = try await api.create(template, fromPool: true)
                        guard view.fromPool else { throw BenchError("the API clone did not come from the pool") }
                        poolAPI.append(seconds)
                        _ = try await api.call("DELETE", "/v1/clones/\(view.id)")
                    }
                }
            }

            log.note("fan-out: \(burst) API creates at once, fresh and from a pool of \(burst)")
            try await api.setPool(template, size: burst)
            var oneFresh: [Double] = [], onePool: [Double] = []
            var burstFresh: [Burst] = [], burstPool: [Burst] = []
            for run in 0..<burstRuns {
                for step in 0..<2 {
                    let fromPool = (step + run) % 2 == 0
                    try await api.waitForPool(template, ready: burst)
                    let (alone, view) = try await api.create(template, fromPool: fromPool)
                    if fromPool { onePool.append(alone) } else { oneFresh.append(alone) }
                    _ = try await api.call("DELETE", "/v1/clones/\(view.id)")
                    try await api.waitForPool(template, ready: burst)
                    let started = ContinuousClock.now
                    let answers = try await withThrowingTaskGroup(of: (Double, CloneView).self) { group in
                        for _ in 0..<burst { group.addTask { try await api.create(template, fromPool: fromPool) } }
                        var all: [(Double, CloneView)] = []
                        for try await answer in group { all.append(answer) }
                        return all
                    }
                    let wall = started.duration(to: .now).seconds
                    let latencies = answers.map(\.0).sorted()
                    let result = Burst(clonesPerSecond: Double(burst) / wall, p50: Self.percentile(latencies, 0.5), p95: Self.percentile(latencies, 0.95), wall: wall)
                    if fromPool { burstPool.append(result) } else { burstFresh.append(result) }
                    if fromPool, answers.contains(where: { !$0.1.fromPool }) { log.note("a burst create found the pool empty: it was restored fresh") }
                    for (_, view) in answers { _ = try await api.call("DELETE", "/v1/clones/\(view.id)") }
                }
            }
            try await api.setPool(template, size: 0)

            func phase(_ path: KeyPath<CloneTimings, Double>) -> Summary { Summary(phases.map { $0[keyPath: path] }) }
            let freshPhases = Phases(admission: phase(\.admission), spawn: phase(\.spawn), restore: phase(\.restore), devices: phase(\.devices), resume: phase(\.resume), records: phase(\.records), total: phase(\.total))
            let floorMedian = Summary(floors).median, freshMedian = Summary(fresh).median, versionMedian = Summary(versions).median
            let poolCLIMedian = Summary(poolCLI).median, poolAPIMedian = Summary(poolAPI).median
            let targets = [
                Target(name: "fresh CLI clone vs tuned in-process restore of its command line", measured: "\(Format.ratio(freshMedian / floorMedian)) (\(Format.milliseconds(freshMedian)) vs \(Format.milliseconds(floorMedian)))", limit: "<= 1.25×", pass: freshMedian / floorMedian <= 1.25),
                Target(name: "CLI hand-out vs the CLI's own start (--version)", measured: "\(Format.ratio(poolCLIMedian / versionMedian)) (\(Format.milliseconds(poolCLIMedian)) vs \(Format.milliseconds(versionMedian)))", limit: "<= 2×", pass: poolCLIMedian / versionMedian <= 2),
                Target(name: "API hand-out vs fresh CLI clone", measured: "\(Format.ratio(poolAPIMedian / freshMedian)) (\(Format.milliseconds(poolAPIMedian)))", limit: "<= 0.05×", pass: poolAPIMedian / freshMedian <= 0.05),
            ]
            let results = Results(host: workspace.host, floor: Summary(floors), freshCLI: Summary(fresh), freshCLIPhases: freshPhases, version: Summary(versions), poolCLI: Summary(poolCLI), poolAPI: Summary(poolAPI), otherFreshCLI: otherBinary == nil ? nil : Summary(otherFresh), otherPoolCLI: otherBinary == nil ? nil : Summary(otherPool), oneFreshAPI: Summary(oneFresh), onePoolAPI: Summary(onePool), burstFresh: burstFresh, burstPool: burstPool, targets: targets)
            if common.json { return try printJSON(results) }
            let row = Summary.tableRow
            func burstRow(_ name: String, _ bursts: [Burst], alone: Summary) -> [String] {
                let best = bursts.max { $0.clonesPerSecond < $1.clonesPerSecond }
                return [name, bursts.map { String(format: "%.1f", $0.clonesPerSecond) }.joined(separator: ", "),
                        bursts.map { Format.milliseconds($0.p50) }.joined(separator: ", "),
                        bursts.map { Format.milliseconds($0.p95) }.joined(separator: ", "),
                        Format.milliseconds(alone.median), best.map { Format.ratio($0.p50 / alone.median) } ?? "-"]
            }
            let h = results.host
            print("""
                \(h.date), \(h.cores) cores, Linux \(h.kernel), \(h.qemu), TCG, load \(h.loadAverage) -> \(HostFacts.loadAverage)

                \(Format.table(["", "runs", "median", "min", "max"], [
                    row("floor: CloneLauncher's command line + restore + cont, in-process", results.floor),
                    row("vmtemplate clone --no-pool (fresh, CLI)", results.freshCLI),
                    row("  admission", freshPhases.admission), row("  spawn", freshPhases.spawn), row("  restore", freshPhases.restore),
                    row("  devices", freshPhases.devices), row("  resume", freshPhases.resume), row("  records", freshPhases.records),
                    row("  total (inside the CLI)", freshPhases.total),
                    row("vmtemplate --version", results.version),
                    row("pool hand-out, CLI", results.poolCLI),
                    row("pool hand-out, API (POST until 201)", results.poolAPI),
                ] + (otherBinary.map { other in [
                    row("\(other): clone --no-pool", Summary(otherFresh)),
                    row("\(other): pool hand-out", Summary(otherPool)),
                ] } ?? [])))

                \(Format.table(["\(burst) API creates at once", "clones/s (each run)", "p50", "p95", "one alone (median)", "p50 / alone"], [
                    burstRow("fresh", burstFresh, alone: Summary(oneFresh)),
                    burstRow("from a pool of \(burst)", burstPool, alone: Summary(onePool)),
                ]))

                \(targets.map(\.line).joined(separator: "\n"))
                """)
        }
    }

    static func percentile(_ sorted: [Double], _ p: Double) -> Double {
        guard !sorted.isEmpty else { return .nan }
        let index = min(sorted.count - 1, Int((Double(sorted.count) * p).rounded(.up)) - 1)
        return sorted[max(0, index)]
    }

    /// One restore of a clone's own command line, in this process: the launcher's arguments
    /// (sandbox included), spawn, the launcher's pipelined restore, `cont`; then the QEMU is
    /// killed. Seconds from before the spawn to `cont` answered.
    func floor(_ launcher: CloneLauncher, _ template: PublishedTemplate) async throws -> Double {
        let id = CloneRecord.newID()
        let directory = launcher.store.cloneDirectory(id)
        guard mkdir(directory, 0o755) == 0 else { throw BenchError("mkdir \(directory): \(String(cString: strerror(errno)))") }
        defer { try? FileSystem.removeTree(path: directory) }
        let (qemuPath, capabilities) = try launcher.qemuFor(template.manifest)
        let memory = try CloneLauncher.memoryOptions(capabilities: capabilities, allowWritableTemplate: false).options
        let started = ContinuousClock.now
        let commandLine = try launcher.commandLine(for: template, cloneID: id, vmgenid: UUID().uuidString.lowercased(), memoryOptions: memory, translationCacheMiB: nil)
        let qemu = try QEMUInstance.launch(arguments: try commandLine.arguments(), name: commandLine.name, paths: launcher.store.clonePaths(id), qmp: commandLine.qmp, executable: qemuPath, transparentHugePages: false)
        Cleanup.shared.adopt(qemu: qemu)
        let seconds: Double
        do {
            let (qmp, loaded) = try await launcher.restore(template, into: qemu, cloneID: id, timeout: .seconds(30))
            defer { qmp.close() }
            try await loaded()
            try await qmp.cont()
            seconds = started.duration(to: .now).seconds
        } catch {
            _ = try? await qemu.stop(grace: .zero, politely: false)
            Cleanup.shared.release(qemu: qemu)
            throw error
        }
        _ = try? await qemu.stop(grace: .zero, politely: false)
        Cleanup.shared.release(qemu: qemu)
        return seconds
    }
}

/// The benchmark's client of `vmtemplate serve`, on the library's own `UnixHTTPClient`.
struct APIClient: Sendable {
    let client: UnixHTTPClient

    init(socketPath: String) {
        client = UnixHTTPClient(socketPath: socketPath)
    }

    func call(_ method: String, _ path: String, _ body: String? = nil) async throws -> UnixHTTPClient.Reply {
        let client = self.client
        return try await onOwnThread { try client.request(method, path, body: body.map { Data($0.utf8) }) }
    }

    func waitUntilUp(server: ChildProcess) async throws {
        let deadline = ContinuousClock.now + .seconds(30)
        while (try? await call("GET", "/v1/pools")) == nil {
            guard ContinuousClock.now < deadline else { throw BenchError("vmtemplate serve did not answer: \(server.stderr)") }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    func setPool(_ template: String, size: Int) async throws {
        let reply = try await call("PUT", "/v1/pools/\(template)", #"{"size": \#(size)}"#)
        guard reply.status == 200 else { throw BenchError("PUT /v1/pools/\(template): \(reply.status)") }
    }

    func ready(_ template: String) async -> Int {
        guard let reply = try? await call("GET", "/v1/pools"),
              let pools = try? JSONDecoder().decode([WarmPool.Status].self, from: reply.body) else { return -1 }
        return pools.first { $0.template == template }?.ready ?? 0
    }

    func waitForPool(_ template: String, ready size: Int) async throws {
        let deadline = ContinuousClock.now + .seconds(300)
        while await ready(template) < size {
            guard ContinuousClock.now < deadline else { throw BenchError("the pool did not reach \(size) members in 300 s") }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    /// `POST /v1/clones` until `201`: seconds, and the clone.
    func create(_ template: String, fromPool: Bool) async throws -> (Double, CloneView) {
        let started = ContinuousClock.now
        let reply = try await call("POST", "/v1/clones", fromPool ? #"{"template": "\#(template)"}"# : #"{"template": "\#(template)", "no_pool": true}"#)
        let seconds = started.duration(to: .now).seconds
        guard reply.status == 201 else { throw BenchError("POST /v1/clones: \(reply.status) \(String(decoding: reply.body, as: UTF8.self))") }
        return (seconds, try JSONCoding.decoder().decode(CloneView.self, from: reply.body))
    }
}
