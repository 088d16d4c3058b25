import ArgumentParser
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

struct Doctor: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "doctor",
        abstract: "Check QEMU and the accelerator: what vmtemplate will use and what it can do.",
        discussion: "Examples:\n  vmtemplate doctor\n  vmtemplate doctor --json"
    )

    @Flag(help: "Print one JSON object.")
    var json = false

    @OptionGroup var qemu: QEMUOptions

    func run() async throws {
        let report = DoctorReport.run(explicitQEMU: qemu.qemuPath)
        if json {
            try Terminal.printJSON(report)
        } else {
            func yesNo(_ value: Bool) -> String { value ? "yes" : "no" }
            print(TextTable.render([
                ["qemu", report.qemuPath ?? "not found"],
                ["version", [report.qemuVersion, report.qemuPackage.map { "(\($0))" }].compactMap { $0 }.joined(separator: " ")],
                ["memory-backend-file rom=", yesNo(report.supportsROM)],
                ["file: migration", yesNo(report.supportsFileMigration)],
                ["kvm usable", "\(yesNo(report.kvmUsable)): \(report.kvmReason)"],
                ["default accel", report.defaultAccel.rawValue],
                ["qemu confinement", report.confinement],
            ]))
            for warning in report.warnings { print(TerminalText.escape("warning: \(warning)")) }
            for problem in report.problems { print(TerminalText.escape("problem: \(problem)")) }
        }
        if !report.problems.isEmpty { throw ExitCode.failure }
    }
}

struct GC: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gc",
        abstract: "Remove leftovers of interrupted commands and kill the QEMU they left running.",
        discussion: "Examples:\n  vmtemplate gc\n  vmtemplate gc --json"
    )

    @Flag(help: "Print one JSON object.")
    var json = false

    @OptionGroup var store: StoreOptions

    func run() async throws {
        try await reportingErrors {
            let report = await GarbageCollector(store: try store.open()).collect()
            if json {
                try Terminal.printJSON(report)
                return
            }
            for entry in report.removedStaging { print("removed unfinished template \(entry)") }
            for id in report.removedClones { print("removed clone \(id)") }
            for pid in report.stoppedQEMU { print("stopped orphaned QEMU \(pid)") }
            for path in report.removedFiles { print("removed leftover \(TerminalText.escape(path))") }
            for problem in report.problems { Terminal.note("warning: \(problem)") }
            if report.isEmpty && report.problems.isEmpty { print("nothing to clean up") }
        }
    }
}
