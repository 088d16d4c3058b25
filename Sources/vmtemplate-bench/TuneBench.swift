import ArgumentParser
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

struct TuneBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tune",
        abstract: "TCG translation cache sizes (and malloc / huge page settings): idle memory per clone against a busy guest's speed.",
        discussion: """
            Phase 1 sweeps --tcg-tb-size: for each size, a fresh CLI clone idles, its QEMU's own \
            private memory is read, then the guest runs 'hash N' (CPU-bound) over its control \
            channel. The recommended size is the smallest whose hash median stays within --limit of \
            QEMU's default, with every larger size also within it. Phase 2 measures, at that size, \
            MALLOC_ARENA_MAX=1, a fixed MALLOC_TRIM_THRESHOLD_, and no transparent huge pages \
            (prctl PR_SET_THP_DISABLE, inherited by the CLI and its QEMU). Configurations are \
            interleaved in every repetition, in a rotating order.
            """
    )

    @OptionGroup var common: CommonOptions

    @Option(help: "Repetitions of every configuration.")
    var reps = 3

    @Option(name: .customLong("tb-sizes"), help: ArgumentHelp("TCG translation cache sizes to try besides QEMU's default, in MiB.", valueName: "list"))
    var tbSizes = "32,16,8,4,2"

    @Option(name: .customLong("hash-mib"), help: ArgumentHelp("MiB the guest hashes.", valueName: "MiB"))
    var hashMiB = 64

    @Option(help: "Seconds each clone idles before its memory is read.")
    var idleSeconds = 10

    @Option(help: "Largest accepted hash time as a multiple of the default's.")
    var limit = 1.10

    @Flag(help: "Only phase 1 (the tb-size sweep).")
    var skipExtras = false

    func validate() throws {
        guard reps >= 1, hashMiB >= 1, idleSeconds >= 0, limit >= 1 else { throw ValidationError("--reps and --hash-mib must be at least 1, --limit at least 1") }
        guard parsedSizes != nil else { throw ValidationError("--tb-sizes takes positive whole MiB separated by commas, e.g. 32,16,8") }
    }

    private var parsedSizes: [Int]? {
        let sizes = tbSizes.split(separator: ",").map { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard !sizes.isEmpty, sizes.allSatisfy({ ($0 ?? 0) > 0 }) else { return nil }
        return sizes.compactMap { $0 }
    }

    struct Configuration: Codable, Sendable {
        var name: String
        var settings: CloneSettings
    }

    struct Sample: Codable, Sendable {
        var cloneSeconds: Double
        var idle: MemoryReport
        var firstPingSeconds: Double
        var hashSeconds: Double
        var busyQEMUOwnBytes: Double

        enum CodingKeys: String, CodingKey {
            case cloneSeconds = "clone_seconds"
            case idle
            case firstPingSeconds = "first_ping_seconds"
            case hashSeconds = "hash_seconds"
            case busyQEMUOwnBytes = "busy_qemu_own_bytes"
        }
    }

    struct ConfigurationResult: Codable, Sendable {
        var configuration: Configuration
        var samples: [Sample]
        var clone: Summary
        var idleQEMUOwn: Summary
        var idleTranslationCache: Summary
        var idleHeap: Summary
        var busyQEMUOwn: Summary
        var firstPing: Summary
        var hash: Summary
        /// Hash median over the default configuration's hash median, in the same phase.
        var hashRatio: Double
        var withinLimit: Bool

        enum CodingKeys: String, CodingKey {
            case configuration, samples, clone
            case idleQEMUOwn = "idle_qemu_own_bytes"
            case idleTranslationCache = "idle_tcg_cache_bytes"
            case idleHeap = "idle_heap_bytes"
            case busyQEMUOwn = "busy_qemu_own_bytes"
            case firstPing = "first_ping_seconds"
            case hash = "hash_seconds"
            case hashRatio = "hash_ratio"
            case withinLimit = "within_limit"
        }
    }

    struct Results: Codable {
        var host: HostFacts
        var reps: Int
        var hashMiB: Int
        var idleSeconds: Int
        var limit: Double
        var sweep: [ConfigurationResult]
        var recommendedTBSizeMiB: Int?
        var extras: [ConfigurationResult]
        var targets: [Target]
        var loadAverageAfter: String

        enum CodingKeys: String, CodingKey {
            case host, reps
            case hashMiB = "hash_mib"
            case idleSeconds = "idle_seconds"
            case limit, sweep
            case recommendedTBSizeMiB = "recommended_tb_size_mib"
            case extras, targets
            case loadAverageAfter = "load_average_after"
        }
    }

    func run() async throws {
        try await benchmarking {
            let log = Log()
            let workspace = try await Workspace.prepare(common.workspaceOptions, log: log)
            let sizes = parsedSizes ?? []
            // Warm-up, not counted.
            let warm = try await CLI.clone(workspace)
            try await CLI.remove(workspace, [warm.clone])

            let sweepConfigurations = [Configuration(name: "default", settings: CloneSettings())]
                + sizes.map { Configuration(name: "tb-size \($0)", settings: CloneSettings(tcgTranslationCacheMiB: $0)) }
            let sweep = try await measure(sweepConfigurations, workspace: workspace, phase: "sweep", log: log)

            // The smallest size that passes with every larger size passing too: one lucky run of a
            // small size must not win over a failing larger one.
            var recommended: Int?
            for result in sweep.dropFirst().sorted(by: { ($0.configuration.settings.tcgTranslationCacheMiB ?? 0) > ($1.configuration.settings.tcgTranslationCacheMiB ?? 0) }) {
                guard result.withinLimit else { break }
                recommended = result.configuration.settings.tcgTranslationCacheMiB
            }

            var extras: [ConfigurationResult] = []
            if !skipExtras {
                extras = try await measure(extraConfigurations(recommended: recommended), workspace: workspace, phase: "extras", log: log)
            }

            var results = Results(host: workspace.host, reps: reps, hashMiB: hashMiB, idleSeconds: idleSeconds, limit: limit, sweep: sweep, recommendedTBSizeMiB: recommended, extras: extras, targets: [], loadAverageAfter: HostFacts.loadAverage)
            results.targets = targets(results)
            if common.json {
                try printJSON(results)
            } else {
                print(render(results))
            }
        }
    }

    /// Phase 2: malloc and huge page settings at QEMU's default cache size and, if there is one,
    /// at the recommended size; the default first, as the reference of the hash ratio.
    private func extraConfigurations(recommended: Int?) -> [Configuration] {
        var configurations: [Configuration] = []
        for size in [nil] + (recommended.map { [$0] } ?? []) {
            let base = CloneSettings(tcgTranslationCacheMiB: size)
            let name = size.map { "tb-size \($0)" } ?? "default"
            var arena = base
            arena.environment = ["MALLOC_ARENA_MAX": "1"]
            var trim = base
            // glibc's initial value, fixed: setting it turns off glibc's dynamic threshold, which
            // otherwise grows with the largest freed mmap chunk and lets the heap stay big.
            trim.environment = ["MALLOC_TRIM_THRESHOLD_": "131072"]
            var noHugePages = base
            noHugePages.disableTransparentHugePages = true
            var all = base
            all.environment = arena.environment.merging(trim.environment) { $1 }
            all.disableTransparentHugePages = true
            configurations.append(Configuration(name: name, settings: base))
            if size == nil {
                configurations += [
                    Configuration(name: "\(name) + MALLOC_ARENA_MAX=1", settings: arena),
                    Configuration(name: "\(name) + MALLOC_TRIM_THRESHOLD_=128K", settings: trim),
                ]
            }
            configurations += [
                Configuration(name: "\(name) + no THP", settings: noHugePages),
                Configuration(name: "\(name) + all three", settings: all),
            ]
        }
        return configurations
    }

    /// Every configuration `reps` times, interleaved, in an order rotated each repetition.
    private func measure(_ configurations: [Configuration], workspace: Workspace, phase: String, log: Log) async throws -> [ConfigurationResult] {
        var samples = Array(repeating: [Sample](), count: configurations.count)
        for rep in 0..<reps {
            for step in configurations.indices {
                let index = (step + rep) % configurations.count
                log.note("\(phase) \(rep + 1)/\(reps): \(configurations[index].name)")
                samples[index].append(try await sample(configurations[index].settings, workspace: workspace))
            }
        }
        let defaultHash = Summary(samples[0].map(\.hashSeconds)).median
        return configurations.indices.map { index in
            let s = samples[index]
            let hash = Summary(s.map(\.hashSeconds))
            func part(_ sample: Sample, _ prefix: String) -> Double {
                sample.idle.breakdown.filter { $0.kind.hasPrefix(prefix) }.map(\.bytes).reduce(0, +)
            }
            return ConfigurationResult(
                configuration: configurations[index], samples: s,
                clone: Summary(s.map(\.cloneSeconds)),
                idleQEMUOwn: Summary(s.map(\.idle.qemuOwnBytes)),
                idleTranslationCache: Summary(s.map { part($0, "TCG") }),
                idleHeap: Summary(s.map { part($0, "heap") }),
                busyQEMUOwn: Summary(s.map(\.busyQEMUOwnBytes)),
                firstPing: Summary(s.map(\.firstPingSeconds)),
                hash: hash,
                hashRatio: hash.median / defaultHash,
                withinLimit: hash.median <= limit * defaultHash
            )
        }
    }

    /// A fresh clone: idle, memory, first ping, hash, memory again, removed.
    private func sample(_ settings: CloneSettings, workspace: Workspace) async throws -> Sample {
        let (cloneSeconds, clone) = try await CLI.clone(workspace, settings)
        do {
            guard let pid = clone.pid else { throw BenchError("the clone JSON has no pid") }
            try await Task.sleep(for: .seconds(idleSeconds))
            let idle = try MemoryReport.clone(pid: pid, templateFile: workspace.memoryFile)
            let ping = try await ControlChannel.request("ping", socket: clone.controlSocket, expecting: "pong")
            let hash = try await ControlChannel.request("hash \(hashMiB)", socket: clone.controlSocket, expecting: "hashed \(hashMiB) ")
            let busy = try MemoryReport.clone(pid: pid, templateFile: workspace.memoryFile)
            try await CLI.remove(workspace, [clone])
            return Sample(cloneSeconds: cloneSeconds, idle: idle, firstPingSeconds: ping.seconds, hashSeconds: hash.seconds, busyQEMUOwnBytes: busy.qemuOwnBytes)
        } catch {
            try? await CLI.remove(workspace, [clone])
            throw error
        }
    }

    private func targets(_ r: Results) -> [Target] {
        let mebibyte = 1_048_576.0
        var targets: [Target] = []
        if let size = r.recommendedTBSizeMiB, let result = r.sweep.first(where: { $0.configuration.settings.tcgTranslationCacheMiB == size }) {
            targets.append(Target(name: "hash \(r.hashMiB) with tb-size \(size) vs default", measured: Format.ratio(result.hashRatio), limit: "<= \(Format.ratio(r.limit))", pass: result.withinLimit))
            targets.append(Target(name: "QEMU's own memory per idle clone with tb-size \(size)", measured: Format.mebibytes(result.idleQEMUOwn.median), limit: "<= 16 MiB", pass: result.idleQEMUOwn.median <= 16 * mebibyte))
        } else {
            targets.append(Target(name: "a tb-size keeping hash \(r.hashMiB) within \(Format.ratio(r.limit)) of default", measured: "none in the sweep", limit: "some", pass: false))
        }
        if let best = r.extras.filter(\.withinLimit).min(by: { $0.idleQEMUOwn.median < $1.idleQEMUOwn.median }) {
            targets.append(Target(name: "QEMU's own memory per idle clone, best setting within the speed limit (\(best.configuration.name))", measured: Format.mebibytes(best.idleQEMUOwn.median), limit: "<= 16 MiB", pass: best.idleQEMUOwn.median <= 16 * mebibyte))
        }
        return targets
    }

    private func render(_ r: Results) -> String {
        func table(_ results: [ConfigurationResult]) -> String {
            Format.table(["configuration", "clone", "idle QEMU own", "(TCG cache)", "(heap)", "min-max own", "after hash", "first ping", "hash \(r.hashMiB) median", "min-max", "vs default", "within", "THP"], results.map { c in
                let hugePages = Set(c.samples.map { $0.idle.transparentHugePages.map { $0 ? "on" : "off" } ?? "?" }).sorted().joined(separator: "/")
                return [c.configuration.name, Format.milliseconds(c.clone.median), Format.mebibytes(c.idleQEMUOwn.median), Format.mebibytes(c.idleTranslationCache.median), Format.mebibytes(c.idleHeap.median),
                 "\(Format.mebibytes(c.idleQEMUOwn.min))-\(Format.mebibytes(c.idleQEMUOwn.max))", Format.mebibytes(c.busyQEMUOwn.median), Format.milliseconds(c.firstPing.median),
                 Format.milliseconds(c.hash.median), "\(Format.milliseconds(c.hash.min))-\(Format.milliseconds(c.hash.max))", Format.ratio(c.hashRatio), c.withinLimit ? "yes" : "NO", hugePages]
            })
        }
        let h = r.host
        var text = """
            \(h.date), \(h.cores) cores, Linux \(h.kernel), \(h.qemu), TCG, THP \(h.transparentHugePages), load \(h.loadAverage) -> \(r.loadAverageAfter)
            \(r.reps) repetitions, idle \(r.idleSeconds) s, hash \(r.hashMiB) MiB, limit \(Format.ratio(r.limit)) of default (medians)

            tb-size sweep
            \(table(r.sweep))

            recommended tb-size: \(r.recommendedTBSizeMiB.map { "\($0) MiB" } ?? "none (no size within the limit)")
            """
        if !r.extras.isEmpty {
            text += "\n\nmalloc and huge pages\n" + table(r.extras)
        }
        text += "\n\n" + r.targets.map(\.line).joined(separator: "\n")
        return text
    }
}
