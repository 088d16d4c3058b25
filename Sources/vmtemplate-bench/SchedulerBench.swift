import ArgumentParser
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

#if canImport(Glibc)
import Glibc
#endif

/// `list --json` over many live clones against reading their smaps with `cat`; and how long the
/// scheduler takes from a clone crossing its copy-on-write limit to the action.
struct SchedulerBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scheduler",
        abstract: "list --json with many clones versus cat of their smaps; scheduler reaction time."
    )

    @OptionGroup var common: CommonOptions

    @Option(help: "Live clones for the list measurement.")
    var clones = 64

    @Option(help: "Runs of list --json and of cat (interleaved).")
    var runs = 10

    @Option(help: "Reaction-time trials.")
    var trials = 5

    @Option(help: "Scheduler interval in seconds for the reaction-time trials.")
    var interval = 1.0

    struct Results: Codable {
        var host: HostFacts
        var clones: Int
        var list: Summary
        var catSmaps: Summary
        var interval: Double
        /// Seconds from the first sample over the limit (taken every 5 ms by the bench) to the
        /// scheduler's JSON line.
        var reaction: Summary
        var targets: [Target]
    }

    func run() async throws {
        try await benchmarking {
            let log = Log()
            let workspace = try await Workspace.prepare(common.workspaceOptions, log: log)
            log.note("starting \(clones) clones")
            var started: [CLIClone] = []
            while started.count < clones {
                let batch = min(8, clones - started.count)
                started += try await CLI.concurrentClones(workspace, count: batch).clones
            }
            let pids = started.compactMap(\.pid)

            log.note("timing list --json against cat of \(pids.count) smaps files, \(runs) runs each")
            let (list, cat) = try await CLI.listAgainstCat(workspace, pids: pids, runs: runs)
            try await CLI.remove(workspace, started)

            log.note("timing the scheduler's reaction, \(trials) trials at \(interval) s")
            var reactions: [Double] = []
            for _ in 0..<trials {
                reactions.append(try await reaction(workspace))
            }

            let reaction = Summary(reactions)
            let targets = [
                Target(name: "list --json with \(pids.count) clones vs cat of their smaps", measured: Format.ratio(list.median / cat.median), limit: "<= 3x", pass: list.median <= 3 * cat.median),
                Target(name: "reaction from crossing the limit to the action", measured: String(format: "%.2f intervals", reaction.median / interval), limit: "<= 2 intervals", pass: reaction.max <= 2 * interval),
            ]
            let results = Results(host: workspace.host, clones: pids.count, list: list, catSmaps: cat, interval: interval, reaction: reaction, targets: targets)
            if common.json { return try printJSON(results) }
            print(Format.table(["measurement", "median", "min", "max"], [
                ["list --json (\(pids.count) clones)", Format.milliseconds(list.median), Format.milliseconds(list.min), Format.milliseconds(list.max)],
                ["cat of their smaps", Format.milliseconds(cat.median), Format.milliseconds(cat.min), Format.milliseconds(cat.max)],
                ["scheduler reaction (interval \(interval) s)", Format.milliseconds(reaction.median), Format.milliseconds(reaction.min), Format.milliseconds(reaction.max)],
            ]))
            for target in targets { print(target.line) }
        }
    }

    /// One clone with a 32 MiB limit dirtying 64 MiB under a running scheduler: the time from the
    /// first 5 ms sample that saw it over the limit to the scheduler's log line.
    private func reaction(_ workspace: Workspace) async throws -> Double {
        let limit: UInt64 = 32 * 1024 * 1024
        let base = "\(workspace.scratch)/clone-\(UUID().uuidString.prefix(8))"
        let child = try ChildProcess.spawn(workspace.vmtemplate, ["clone", workspace.template.value, "--store", workspace.store.root, "--json", "--cow-limit", "32M", "--over-limit", "pause"], outputBase: base)
        let (status, _) = try await child.wait()
        defer { child.removeOutput() }
        guard status == 0, let clone = try? JSONDecoder().decode(CLIClone.self, from: Data(child.stdout.utf8)), let pid = clone.pid else {
            throw BenchError("clone for the reaction trial failed: \(child.stderr)")
        }
        let scheduler = try ChildProcess.spawn(workspace.vmtemplate, ["scheduler", "--interval", String(interval), "--store", workspace.store.root], outputBase: "\(workspace.scratch)/sched-\(UUID().uuidString.prefix(8))")
        // On failure the bench's sweep stops the scheduler with every other child it started.
        defer { scheduler.removeOutput() }
        // Ask the guest to dirty memory; its reply never comes once it is paused, so don't wait.
        let channel = ControlChannel(path: clone.controlSocket)
        let socket = try channel.connect()
        defer { close(socket) }
        try channel.send(["dirty 64"], on: socket)
        var crossed: ContinuousClock.Instant?
        let deadline = ContinuousClock.now + .seconds(60)
        while ContinuousClock.now < deadline {
            if crossed == nil, let usage = try? CloneMemoryUsage.measure(pid: pid, templateFile: workspace.memoryFile), usage.copyOnWriteBytes > limit {
                crossed = .now
            }
            if let crossed, scheduler.stdout.contains("\"clone\":\"\(clone.id)\"") {
                let seconds = crossed.duration(to: .now).seconds
                _ = await scheduler.waitAfterTerm()
                try await CLI.remove(workspace, [clone])
                return seconds
            }
            try await Task.sleep(for: .milliseconds(5))
        }
        throw BenchError("the scheduler did not act on clone \(clone.id) within 60 s")
    }
}

extension ChildProcess {
    /// Sends SIGTERM and reaps the child.
    func waitAfterTerm() async -> Int32? {
        _ = try? handle.signal(SIGTERM)
        return try? await wait().status
    }
}
