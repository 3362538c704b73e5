// Android Studio / Gradle entry point of the phone demo (written for AGP 8.x; Google's Maven and the Gradle
// distribution are not reachable where this was made, so this build was not run there: the Maven POMs are
// what compiled and tested the same sources — see docs/android.md).
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}

dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}

rootProject.name = "koedge-android-demo"
include(":engine", ":app")
