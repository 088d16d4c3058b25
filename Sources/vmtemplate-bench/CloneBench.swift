import ArgumentParser
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

struct CloneBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "clone",
        abstract: "Clone start-up against QEMU's own start-up, a Kata-style clone and a cold boot; concurrency; memory per idle clone."
    )

    @OptionGroup var common: CommonOptions

    @Option(help: "Runs of the floor, the CLI clone and the Kata-style clone (interleaved).")
    var runs = 15

    @Option(help: "Cold boots (about 3 s each under TCG).")
    var coldRuns = 3

    @Option(help: "Clones (and floors) started at once.")
    var concurrency = 16

    @Option(help: "Repetitions of the concurrent batches (alternating which goes first).")
    var concurrentRuns = 3

    @Option(help: "Seconds a clone and a cold-booted VM stay idle before their memory is read.")
    var idleSeconds = 10

    @Option(name: .customLong("also-vmtemplate"), help: ArgumentHelp("A second vmtemplate binary (e.g. built with --static-swift-stdlib) timed in the same runs.", valueName: "path"))
    var otherVMTemplate: String?

    @Option(name: .customLong("also-environment"), help: ArgumentHelp("KEY=VALUE for --also-vmtemplate's runs only (repeatable), e.g. VMTEMPLATE_QEMU_SANDBOX=off with the same binary to measure what QEMU's confinement costs.", valueName: "KEY=VALUE"))
    var otherEnvironment: [String] = []

    private var otherSettings: CloneSettings {
        var settings = CloneSettings()
        for pair in otherEnvironment {
            let parts = pair.split(separator: "=", maxSplits: 1).map(String.init)
            if parts.count == 2 { settings.environment[parts[0]] = parts[1] }
        }
        return settings
    }

    func validate() throws {
        guard runs >= 1, coldRuns >= 1, concurrency >= 1, concurrentRuns >= 1, idleSeconds >= 0 else {
            throw ValidationError("counts must be at least 1 (--idle-seconds at least 0)")
        }
    }

    struct Results: Codable {
        var host: HostFacts
        var template: String
        var store: String
        var vmtemplate: String
        var floor: Summary
        /// The same floor QEMUs, until they answered their first QMP command.
        var floorReady: Summary
        var clone: Summary
        /// --also-vmtemplate's clones, if given.
        var otherClone: Summary?
        var otherVMTemplate: String?
        var kata: Summary
        var coldBoot: Summary
        var concurrency: Int
        var concurrentFloors: Summary
        var concurrentFloorsReady: Summary
        var concurrentClones: Summary
        var idleSeconds: Int
        var cloneMemory: MemoryReport
        var coldVMMemory: MemoryReport
        var targets: [Target]
        var loadAverageAfter: String

        enum CodingKeys: String, CodingKey {
            case host, template, store, vmtemplate, floor
            case floorReady = "floor_first_reply"
            case clone
            case otherClone = "other_clone"
            case otherVMTemplate = "other_vmtemplate"
            case kata
            case coldBoot = "cold_boot"
            case concurrency
            case concurrentFloors = "concurrent_floors"
            case concurrentFloorsReady = "concurrent_floors_first_reply"
            case concurrentClones = "concurrent_clones"
            case idleSeconds = "idle_seconds"
            case cloneMemory = "clone_memory"
            case coldVMMemory = "cold_vm_memory"
            case targets
            case loadAverageAfter = "load_average_after"
        }
    }

    func run() async throws {
        try await benchmarking {
            let log = Log()
            let workspace = try await Workspace.prepare(common.workspaceOptions, log: log)
            log.note("template \(workspace.template) in \(workspace.store.root); timing \(workspace.vmtemplate)")

            // Warm-up, not counted: page cache, the binaries, and a check that both restore paths
            // give a guest that answers.
            log.note("warm-up")
            _ = try await Runners.floor(workspace)
            let warm = try await CLI.clone(workspace)
            _ = try await ControlChannel.request("ping", socket: warm.clone.controlSocket, expecting: "pong")
            try await CLI.remove(workspace, [warm.clone])
            _ = try await Runners.kata(workspace, check: true)

            var floors: [Double] = []
            var floorsReady: [Double] = []
            var clones: [Double] = []
            var otherClones: [Double] = []
            if let otherVMTemplate {
                guard FileManager.default.isExecutableFile(atPath: otherVMTemplate) else { throw BenchError("--also-vmtemplate \(otherVMTemplate) is not an executable") }
                let warmOther = try await CLI.clone(workspace, otherSettings, binary: otherVMTemplate)
                try await CLI.remove(workspace, [warmOther.clone])
            }
            var katas: [Double] = []
            for run in 0..<runs {
                log.note("run \(run + 1)/\(runs)")
                // Rotate the order so that no method always runs right after another one.
                let methods = otherVMTemplate == nil ? 3 : 4
                for step in 0..<methods {
                    switch (step + run) % methods {
                    case 0:
                        let floor = try await Runners.floor(workspace)
                        floors.append(floor.greeting)
                        floorsReady.append(floor.firstReply)
                    case 1:
                        let (seconds, clone) = try await CLI.clone(workspace)
                        clones.append(seconds)
                        try await CLI.remove(workspace, [clone])
                    case 3:
                        let (seconds, clone) = try await CLI.clone(workspace, otherSettings, binary: otherVMTemplate)
                        otherClones.append(seconds)
                        try await CLI.remove(workspace, [clone])
                    default:
                        katas.append(try await Runners.kata(workspace))
                    }
                }
            }

            var colds: [Double] = []
            var idleCold: BenchVM?
            for run in 0..<coldRuns {
                log.note("cold boot \(run + 1)/\(coldRuns)")
                let (seconds, vm) = try await Runners.coldBoot(workspace)
                colds.append(seconds)
                if run == coldRuns - 1 { idleCold = vm } else { await vm.stop() }
            }

            // Memory: the last cold-booted VM and a fresh clone, both idle for the same time.
            log.note("memory: a clone and a cold-booted VM idle for \(idleSeconds) s")
            let memory: (clone: MemoryReport, cold: MemoryReport)
            do {
                let idleClone = try await CLI.clone(workspace).clone
                try await Task.sleep(for: .seconds(idleSeconds))
                guard let pid = idleClone.pid, let coldVM = idleCold else { throw BenchError("the clone JSON has no pid") }
                memory = (try MemoryReport.clone(pid: pid, templateFile: workspace.memoryFile),
                          try MemoryReport.coldVM(pid: coldVM.qemu.pid, guestMemoryBytes: workspace.manifest.machine.memoryBytes))
                try await CLI.remove(workspace, [idleClone])
                await coldVM.stop()
            } catch {
                if let idleCold { await idleCold.stop() }
                throw error
            }

            var concurrentFloors: [Double] = []
            var concurrentFloorsReady: [Double] = []
            var concurrentClones: [Double] = []
            for run in 0..<concurrentRuns {
                log.note("\(concurrency) at once \(run + 1)/\(concurrentRuns)")
                for step in 0..<2 {
                    if (step + run) % 2 == 0 {
                        let (seconds, started) = try await CLI.concurrentClones(workspace, count: concurrency)
                        concurrentClones.append(seconds)
                        try await CLI.remove(workspace, started)
                    } else {
                        let floors = try await Runners.concurrentFloors(workspace, count: concurrency)
                        concurrentFloors.append(floors.greeting)
                        concurrentFloorsReady.append(floors.firstReply)
                    }
                }
            }

            var results = Results(
                host: workspace.host, template: workspace.template.value, store: workspace.store.root, vmtemplate: workspace.vmtemplate,
                floor: Summary(floors), floorReady: Summary(floorsReady), clone: Summary(clones), otherClone: otherVMTemplate == nil ? nil : Summary(otherClones), otherVMTemplate: otherVMTemplate, kata: Summary(katas), coldBoot: Summary(colds),
                concurrency: concurrency, concurrentFloors: Summary(concurrentFloors), concurrentFloorsReady: Summary(concurrentFloorsReady), concurrentClones: Summary(concurrentClones),
                idleSeconds: idleSeconds, cloneMemory: memory.clone, coldVMMemory: memory.cold, targets: [],
                loadAverageAfter: HostFacts.loadAverage
            )
            results.targets = targets(results)
            if common.json {
                try printJSON(results)
            } else {
                print(render(results))
            }
        }
    }

    private func targets(_ r: Results) -> [Target] {
        let mebibyte = 1_048_576.0
        let cloneOverFloor = r.clone.median / r.floor.median
        let kataOverClone = r.kata.median / r.clone.median
        let coldOverClone = r.coldBoot.median / r.clone.median
        let concurrent = r.concurrentClones.median / r.concurrentFloors.median
        return [
            Target(name: "clone median vs floor median", measured: Format.ratio(cloneOverFloor) + " (\(Format.milliseconds(r.clone.median)) vs \(Format.milliseconds(r.floor.median)))", limit: "<= 1.25×", pass: cloneOverFloor <= 1.25),
            Target(name: "(for information) clone median vs floor until first QMP reply", measured: Format.ratio(r.clone.median / r.floorReady.median) + " (\(Format.milliseconds(r.clone.median)) vs \(Format.milliseconds(r.floorReady.median)))", limit: "<= 1.25×", pass: r.clone.median / r.floorReady.median <= 1.25),
            Target(name: "Kata-style median vs clone median", measured: Format.ratio(kataOverClone) + " faster", limit: ">= 2.5×", pass: kataOverClone >= 2.5),
            Target(name: "cold boot median vs clone median", measured: Format.ratio(coldOverClone) + " faster", limit: ">= 50×", pass: coldOverClone >= 50),
            Target(name: "\(r.concurrency) concurrent clones vs \(r.concurrency) concurrent floors", measured: Format.ratio(concurrent) + " (\(Format.milliseconds(r.concurrentClones.median)) vs \(Format.milliseconds(r.concurrentFloors.median)))", limit: "<= 1.5×", pass: concurrent <= 1.5),
            Target(name: "(for information) \(r.concurrency) concurrent clones vs \(r.concurrency) concurrent floors until first QMP reply", measured: Format.ratio(r.concurrentClones.median / r.concurrentFloorsReady.median), limit: "<= 1.5×", pass: r.concurrentClones.median / r.concurrentFloorsReady.median <= 1.5),
            Target(name: "QEMU's own private memory per idle clone", measured: Format.mebibytes(r.cloneMemory.qemuOwnBytes), limit: "<= 16 MiB", pass: r.cloneMemory.qemuOwnBytes <= 16 * mebibyte),
        ]
    }

    private func render(_ r: Results) -> String {
        func row(_ name: String, _ s: Summary, _ ratio: String) -> [String] {
            [name, String(s.runs), Format.milliseconds(s.median), Format.milliseconds(s.min), Format.milliseconds(s.max), ratio]
        }
        let timing = Format.table(["start-up", "runs", "median", "min", "max", "ratio"], [
            row("floor: clone's QEMU -S until QMP greeting", r.floor, "1 (base)"),
            row("  the same until its first QMP reply", r.floorReady, Format.ratio(r.floorReady.median / r.floor.median) + " floor"),
            row("vmtemplate clone (CLI, until it returns)", r.clone, Format.ratio(r.clone.median / r.floor.median) + " floor"),
        ] + (r.otherClone.map { [row("vmtemplate clone, --also-vmtemplate binary", $0, Format.ratio($0.median / r.floor.median) + " floor")] } ?? []) + [
            row("Kata-style clone (exec:cat, 100 ms polls)", r.kata, Format.ratio(r.kata.median / r.clone.median) + " clone"),
            row("cold boot until ready marker", r.coldBoot, Format.ratio(r.coldBoot.median / r.clone.median) + " clone"),
            row("\(r.concurrency) floors at once (until the last greeting)", r.concurrentFloors, "1 (base)"),
            row("  the same until the last first QMP reply", r.concurrentFloorsReady, Format.ratio(r.concurrentFloorsReady.median / r.concurrentFloors.median) + " floors"),
            row("\(r.concurrency) CLI clones at once (until the last)", r.concurrentClones, Format.ratio(r.concurrentClones.median / r.concurrentFloors.median) + " floors"),
        ])
        let memory = Format.table(["after \(r.idleSeconds) s idle", "anonymous total", "guest part", "QEMU's own"], [
            ["vmtemplate clone", Format.mebibytes(r.cloneMemory.totalAnonymousBytes), Format.mebibytes(r.cloneMemory.guestBytes) + " (copy-on-write)", Format.mebibytes(r.cloneMemory.qemuOwnBytes)],
            ["cold-booted VM (memory-backend-ram)", Format.mebibytes(r.coldVMMemory.totalAnonymousBytes), Format.mebibytes(r.coldVMMemory.guestBytes) + " (guest RAM)", Format.mebibytes(r.coldVMMemory.qemuOwnBytes)],
        ])
        let kinds = r.cloneMemory.breakdown.map(\.kind) + r.coldVMMemory.breakdown.map(\.kind).filter { kind in !r.cloneMemory.breakdown.contains { $0.kind == kind } }
        func bytes(_ report: MemoryReport, _ kind: String) -> String {
            Format.mebibytes(report.breakdown.first { $0.kind == kind }?.bytes ?? 0)
        }
        let breakdown = Format.table(["QEMU's own memory, by kind", "clone", "cold-booted VM"], kinds.map { [$0, bytes(r.cloneMemory, $0), bytes(r.coldVMMemory, $0)] })
        let largest = Format.table(["largest mappings in the clone", "perms", "size", "anonymous", "of it huge pages", "path"], r.cloneMemory.largestMappings.prefix(8).map {
            [$0.kind, $0.permissions, Format.mebibytes($0.sizeBytes), Format.mebibytes($0.anonymousBytes), Format.mebibytes($0.hugePageBytes), $0.path.map { URL(fileURLWithPath: $0).lastPathComponent } ?? ""]
        })
        let h = r.host
        return """
            \(h.date), \(h.cores) cores, Linux \(h.kernel), \(h.qemu), TCG, THP \(h.transparentHugePages), load \(h.loadAverage) -> \(r.loadAverageAfter)
            template \(r.template), store \(r.store)

            \(timing)

            \(memory)

            \(breakdown)

            \(largest)

            \(r.targets.map(\.line).joined(separator: "\n"))
            """
    }
}
