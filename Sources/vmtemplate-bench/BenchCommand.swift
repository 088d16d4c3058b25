import ArgumentParser
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

@main
struct BenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vmtemplate-bench",
        abstract: "Benchmarks of vmtemplate clones against real QEMU guests (docs/benchmarks.md).",
        discussion: """
            Every figure is a median of runs made in the same invocation, next to the baselines it \
            is compared with, because on a shared machine only side-by-side numbers mean anything. \
            Every QEMU started is killed at the end, on errors and on Ctrl-C; a temporary store is \
            removed.

            Build first: swift build -c release --scratch-path .build-bench
            Examples:
              swift run -c release --scratch-path .build-bench vmtemplate-bench clone --runs 15
              swift run -c release --scratch-path .build-bench vmtemplate-bench tune --json
            """,
        subcommands: [CloneBench.self, DevicesBench.self, PoolBench.self, TuneBench.self, ProfileBench.self, SchedulerBench.self, ScaleBench.self, TargetsBench.self, GuestBench.self]
    )
}

/// Options every benchmark takes.
struct CommonOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Store to use; the template is made in it if missing, and the store is kept (default: a temporary store, removed at the end).", valueName: "path"))
    var store: String?

    @Option(help: "Template to clone (made from --recipe if the store lacks it).")
    var template = "busybox"

    @Option(help: ArgumentHelp("Recipe for the template (default: templates/busybox/template.json).", valueName: "path"))
    var recipe: String?

    @Option(name: .customLong("vmtemplate"), help: ArgumentHelp("vmtemplate binary to time (default: the one next to this executable).", valueName: "path"))
    var vmtemplatePath: String?

    @Flag(help: "Print the results as one JSON object on stdout (progress stays on stderr).")
    var json = false

    var workspaceOptions: Workspace.Options {
        Workspace.Options(storePath: store, templateName: template, recipePath: recipe, vmtemplatePath: vmtemplatePath)
    }
}

/// Runs a benchmark body with the signal handlers installed and a sweep of everything it
/// started at the end, whatever happens.
func benchmarking(_ body: () async throws -> Void) async throws {
    let signalSources = Cleanup.shared.installSignalHandlers()
    defer {
        Cleanup.shared.sweep()
        withExtendedLifetime(signalSources) {}
    }
    do {
        try await body()
    } catch {
        // After Ctrl-C the failures are only the interruption's echo: the handler says it all.
        guard !Cleanup.shared.interrupted else { throw ExitCode(130) }
        switch error {
        case let error as BenchError: Log().note("error: \(error.description)")
        case let error as VMTemplateError: Log().note("error: \(error.message)\(error.cause.map { "\n  \($0)" } ?? "")")
        default: throw error
        }
        throw ExitCode.failure
    }
}

/// One target line: PASS or FAIL, and by how much.
struct Target: Codable, Sendable {
    var name: String
    var measured: String
    var limit: String
    var pass: Bool

    var line: String { "\(pass ? "PASS" : "FAIL")  \(name): \(measured) (target \(limit))" }
}

func printJSON(_ value: some Encodable) throws {
    print(String(decoding: try JSONCoding.encode(value), as: UTF8.self), terminator: "")
}
