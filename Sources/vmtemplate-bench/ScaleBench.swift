import ArgumentParser
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

#if canImport(Glibc)
import Glibc
#endif

/// Density: with 0, 32, 64 and 128 live idle clones, how long `clone` takes, what an idle clone
/// costs in CPU and memory, the host memory in use against cold-booted VMs, and `list`.
struct ScaleBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scale",
        abstract: "clone latency, idle CPU and memory per clone, and list time with 0..128 live idle clones.",
        discussion: """
            The store gets limits (--max-clones and --memory-budget far above what the run uses) so \
            that every clone goes through admission, as on a host that sets them.
            Example:
              .build-static/release/vmtemplate-bench scale --levels 0,32,64,128 --runs 5
            """
    )

    @OptionGroup var common: CommonOptions

    @Option(help: "Numbers of live idle clones to measure at, ascending.")
    var levels = "0,32,64,128"

    @Option(help: "Timed clones at each level (each removed again before the next).")
    var runs = 5

    @Option(help: "Seconds the clones idle before anything is measured at a level (a resumed TCG guest translates code for a while).")
    var settleSeconds = 10.0

    @Option(help: "Seconds over which idle CPU is measured.")
    var idleSeconds = 10.0

    @Option(help: "Runs of list --json and of cat of the smaps at each level (interleaved).")
    var listRuns = 3

    @Flag(help: "Do not set store limits (admission is then skipped).")
    var noLimits = false

    struct Level: Codable {
        var clones: Int
        var clone: Summary
        /// utime + stime of the idle clones' QEMUs over the window, per clone, in % of one core.
        var idleCPUPercentPerClone: Double?
        /// The host's busy CPU over the same window, in % of all cores.
        var hostBusyPercent: Double
        /// Mean over the clones: copy-on-write and QEMU's own private memory.
        var cowBytesPerClone: Double?
        var qemuOwnBytesPerClone: Double?
        /// MemTotal - MemAvailable, less the same figure before any clone ran.
        var hostMemoryInUseBytes: Double
        var list: Summary?
        var catSmaps: Summary?

        enum CodingKeys: String, CodingKey {
            case clones, clone
            case idleCPUPercentPerClone = "idle_cpu_percent_per_clone"
            case hostBusyPercent = "host_busy_percent"
            case cowBytesPerClone = "cow_bytes_per_clone"
            case qemuOwnBytesPerClone = "qemu_own_bytes_per_clone"
            case hostMemoryInUseBytes = "host_memory_in_use_bytes"
            case list
            case catSmaps = "cat_smaps"
        }
    }

    struct Results: Codable {
        var host: HostFacts
        var levels: [Level]
        /// Anonymous memory of one cold-booted VM of the same guest, idle as long as the clones.
        var coldVMBytes: Double
        var targets: [Target]

        enum CodingKeys: String, CodingKey {
            case host, levels
            case coldVMBytes = "cold_vm_bytes"
            case targets
        }
    }

    func run() async throws {
        let counts = levels.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard !counts.isEmpty, counts == counts.sorted(), counts.allSatisfy({ (0...1024).contains($0) }) else {
            throw ValidationError("--levels takes ascending numbers from 0 to 1024, e.g. 0,32,64,128.")
        }
        try await benchmarking {
            let log = Log()
            let workspace = try await Workspace.prepare(common.workspaceOptions, log: log)
            if !noLimits {
                try await vmtemplate(workspace, ["settings", "--max-clones", "4096", "--memory-budget", "64T"])
            }
            let baseline = Self.memoryInUse()

            log.note("one cold-booted VM, for comparison")
            let (_, coldVM) = try await Runners.coldBoot(workspace)
            try await Task.sleep(for: .seconds(settleSeconds))
            let coldBytes = (try? MemoryReport.coldVM(pid: coldVM.qemu.pid, guestMemoryBytes: workspace.manifest.machine.memoryBytes).totalAnonymousBytes) ?? .nan
            await coldVM.stop()

            var live: [CLIClone] = []
            var results: [Level] = []
            for count in counts {
                while live.count < count {
                    let batch = min(8, count - live.count)
                    live += try await CLI.concurrentClones(workspace, count: batch).clones
                }
                log.note("\(count) live clones: settling \(settleSeconds) s, then idle CPU over \(idleSeconds) s")
                try await Task.sleep(for: .seconds(settleSeconds))
                let pids = live.compactMap(\.pid)
                let cpuBefore = pids.map(Self.cpuSeconds)
                let hostBefore = Self.hostCPU()
                try await Task.sleep(for: .seconds(idleSeconds))
                let cpuAfter = pids.map(Self.cpuSeconds)
                let hostAfter = Self.hostCPU()
                let used = zip(cpuBefore, cpuAfter).compactMap { before, after in before.flatMap { b in after.map { $0 - b } } }
                let idleCPU = used.isEmpty ? nil : used.reduce(0, +) / Double(used.count) / idleSeconds * 100
                let hostBusy = (hostAfter.busy - hostBefore.busy) / max(1, hostAfter.total - hostBefore.total) * 100

                let memory = pids.compactMap { try? MemoryReport.clone(pid: $0, templateFile: workspace.memoryFile) }
                let inUse = Self.memoryInUse() - baseline

                var list: Summary?
                var cat: Summary?
                if !pids.isEmpty {
                    log.note("\(count) live clones: list --json against cat of their smaps")
                    (list, cat) = try await CLI.listAgainstCat(workspace, pids: pids, runs: listRuns)
                }

                log.note("\(count) live clones: \(runs) timed clones")
                var cloneSamples: [Double] = []
                for _ in 0..<runs {
                    let (seconds, clone) = try await CLI.clone(workspace)
                    cloneSamples.append(seconds)
                    try await CLI.remove(workspace, [clone])
                }
                results.append(Level(
                    clones: count, clone: Summary(cloneSamples), idleCPUPercentPerClone: idleCPU, hostBusyPercent: hostBusy,
                    cowBytesPerClone: memory.isEmpty ? nil : memory.map(\.guestBytes).reduce(0, +) / Double(memory.count),
                    qemuOwnBytesPerClone: memory.isEmpty ? nil : memory.map(\.qemuOwnBytes).reduce(0, +) / Double(memory.count),
                    hostMemoryInUseBytes: inUse, list: list, catSmaps: cat
                ))
            }
            try await CLI.remove(workspace, live)

            var targets: [Target] = []
            if let first = results.first, let last = results.last, last.clones > first.clones {
                let ratio = last.clone.median / first.clone.median
                targets.append(Target(name: "clone with \(last.clones) live clones vs with \(first.clones)", measured: Format.ratio(ratio), limit: "<= 1.2x", pass: ratio <= 1.2))
            }
            if let last = results.last {
                if let cpu = last.idleCPUPercentPerClone {
                    targets.append(Target(name: "idle CPU per clone with \(last.clones) live", measured: String(format: "%.2f %% of a core", cpu), limit: "<= 0.25 %", pass: cpu <= 0.25))
                }
                if let own = last.qemuOwnBytesPerClone {
                    targets.append(Target(name: "QEMU's own private memory per idle clone", measured: Format.mebibytes(own), limit: "<= 12 MiB", pass: own <= 12 * 1_048_576))
                }
                if let list = last.list, let cat = last.catSmaps {
                    let ratio = list.median / cat.median
                    targets.append(Target(name: "list --json with \(last.clones) clones vs cat of their smaps", measured: Format.ratio(ratio), limit: "<= 3x", pass: ratio <= 3))
                }
            }
            let summary = Results(host: workspace.host, levels: results, coldVMBytes: coldBytes, targets: targets)
            if common.json { return try printJSON(summary) }
            print(Format.table(["live clones", "clone (median)", "idle CPU/clone", "host busy", "COW/clone", "QEMU own/clone", "host mem in use", "vs cold VMs", "list --json", "cat smaps"], results.map { level in
                [String(level.clones), Format.milliseconds(level.clone.median),
                 level.idleCPUPercentPerClone.map { String(format: "%.2f %%", $0) } ?? "-",
                 String(format: "%.0f %%", level.hostBusyPercent),
                 level.cowBytesPerClone.map(Format.mebibytes) ?? "-",
                 level.qemuOwnBytesPerClone.map(Format.mebibytes) ?? "-",
                 Format.mebibytes(level.hostMemoryInUseBytes),
                 level.clones > 0 ? Format.mebibytes(coldBytes * Double(level.clones)) : "-",
                 level.list.map { Format.milliseconds($0.median) } ?? "-",
                 level.catSmaps.map { Format.milliseconds($0.median) } ?? "-"]
            }))
            print("one cold-booted VM, idle: \(Format.mebibytes(coldBytes)) of anonymous memory")
            for target in targets { print(target.line) }
        }
    }

    private func vmtemplate(_ workspace: Workspace, _ arguments: [String]) async throws {
        _ = try await CLI.timed(workspace, workspace.vmtemplate, arguments + ["--store", workspace.store.root])
    }

    /// utime + stime of a process (all its threads), in seconds; nil once it is gone.
    static func cpuSeconds(_ pid: Int32) -> Double? {
        ProcessStat.read(pid: pid).map { Double($0.cpuTicks) / Double(ProcessStat.clockTicksPerSecond) }
    }

    /// The host's busy and total jiffies from /proc/stat's `cpu` line.
    static func hostCPU() -> (busy: Double, total: Double) {
        guard let text = try? String(contentsOfFile: "/proc/stat", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("cpu ") }) else { return (0, 0) }
        let values = line.split(separator: " ").dropFirst().compactMap { Double($0) }
        guard values.count >= 5 else { return (0, 0) }
        let total = values.reduce(0, +)
        // idle and iowait are fields 4 and 5.
        return (total - values[3] - values[4], total)
    }

    /// MemTotal - MemAvailable, in bytes.
    static func memoryInUse() -> Double {
        guard let info = try? MemInfo.read() else { return 0 }
        return Double(info.totalBytes - info.availableBytes)
    }
}
